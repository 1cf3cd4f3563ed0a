"""Command-line flags made from the settings classes: one flag per field, declared nowhere else.

A field `n_ctx` of `WorkerSettings` is the flag `--n-ctx` of every command that
builds `WorkerSettings`; a field of the fake engine's settings is `--fake-…`,
hidden from the help, since no production run sets it. The help text is the
field's description, the default shown is the field's own, and the variable
shown is the one pydantic-settings reads: a new setting is a new flag with no
edit here.

A flag left out is not passed at all, so its environment variable stays in
charge, and only pydantic reads the environment. A flag given reaches pydantic
as the string typed: flag and variable are checked by the same validators, and
a bad value of either is one line naming it (`ConfigError`), never a traceback
or click's usage block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar, get_args, get_origin

import click
from click import types as click_types
from pydantic import AliasChoices, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsError

from tokenfan.shared.errors import ConfigError
from tokenfan.shared.redisconn import redacted

S = TypeVar("S", bound=BaseSettings)
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Group:
    """One settings class as a set of flags: `prefix` keeps two classes' field names apart."""

    cls: type[BaseSettings]
    prefix: str = ""
    hidden: bool = False
    subset: tuple[str, ...] = ()  # only these fields (all when empty)

    def only(self, *fields: str) -> Group:
        return replace(self, subset=fields)

    def param(self, field: str) -> str:
        return f"{self.prefix}_{field}" if self.prefix else field

    def flag(self, field: str) -> str:
        return "--" + self.param(field).replace("_", "-")

    def envs(self, field: str) -> tuple[str, ...]:
        alias = self.cls.model_fields[field].validation_alias
        if isinstance(alias, AliasChoices):
            return tuple(str(a) for a in alias.choices)
        return (str(self.cls.model_config.get("env_prefix", "")) + field).upper(),

    def fields(self) -> Iterable[tuple[str, FieldInfo]]:
        return [(f, i) for f, i in self.cls.model_fields.items() if not self.subset or f in self.subset]

    def given(self, params: dict[str, Any]) -> dict[str, Any]:
        """The fields of this class given on the command line, by field name."""
        return {f: params[self.param(f)] for f, _ in self.fields() if params.get(self.param(f)) is not None}

    def build(self, params: dict[str, Any]) -> Any:
        """The settings: the flags given over the environment over the defaults."""
        given = self.given(params)
        try:
            return self.cls(**given)
        except ValidationError as exc:
            raise ConfigError("; ".join(self._describe(err, given) for err in exc.errors())) from None
        except SettingsError as exc:  # a variable pydantic-settings could not even decode
            raise ConfigError(str(exc)) from None

    def _describe(self, err: Any, given: dict[str, Any]) -> str:
        field = str(err["loc"][0]) if err["loc"] else ""
        if field in given:
            where = self.flag(field)
        elif field in self.cls.model_fields:
            where = self.envs(field)[0]
        else:
            where = field
        given_value = err.get("input")
        if field.lower().endswith("redis_url") and isinstance(given_value, str):  # a URL may hold a password
            given_value = redacted(given_value)
        return f"{where}: {err['msg']} (got {given_value!r})"


class SettingOption(click.Option):
    """A flag for one settings field; shows the field's variable and default, passes neither."""

    def __init__(self, param_decls: list[str], *, envs: tuple[str, ...], field_default: str | None,
                 **attrs: Any) -> None:
        super().__init__(param_decls, **attrs)
        self.envs = envs
        self.field_default = field_default

    def get_help_extra(self, ctx: click.Context) -> click_types.OptionHelpExtra:
        extra = super().get_help_extra(ctx)
        extra["envvars"] = self.envs
        if self.field_default is not None:
            extra["default"] = self.field_default
        return extra


def _option(group: Group, field: str, info: FieldInfo) -> Callable[[F], F]:
    flag = group.flag(field)
    kind: dict[str, Any] = {"is_flag": True} if info.annotation is bool else {"metavar": _metavar(info)}
    decls = [f"{flag}/--no-{flag[2:]}" if info.annotation is bool else flag, group.param(field)]
    return click.option(*decls, cls=SettingOption, envs=group.envs(field), field_default=_shown_default(info),
                        default=None, help=info.description, hidden=group.hidden, **kind)


def _shown_default(info: FieldInfo) -> str | None:
    if info.default_factory is not None or info.default is None:
        return None  # computed when built, or none: the description says what happens
    if isinstance(info.default, bool):
        return str(info.default).lower()
    return str(info.default)


def _metavar(info: FieldInfo) -> str:
    ann = info.annotation
    args = [a for a in get_args(ann) if a is not type(None)]
    if get_origin(ann) is Literal:
        return "[" + "|".join(str(a) for a in get_args(ann)) + "]"
    if get_origin(ann) is list:
        return "A,B,…"
    base = args[0] if args else ann
    return "INTEGER" if base is int else "NUMBER" if base is float else "TEXT"


def options(*groups: Group) -> Callable[[F], F]:
    """Decorate a command with one flag per field of `groups` (a field shared by two of them once)."""

    def decorate(f: F) -> F:
        made: dict[str, Callable[[F], F]] = {}
        for group in groups:
            for field, info in group.fields():
                made.setdefault(group.param(field), _option(group, field, info))
        for option in reversed(made.values()):  # click stacks decorators bottom-up: keep the fields' order
            f = option(f)
        return f

    return decorate


def as_flags(group: Group, params: dict[str, Any]) -> list[str]:
    """The flags given for `group`'s fields, written out again for a child process."""
    out: list[str] = []
    for field, value in group.given(params).items():
        flag = group.flag(field)
        if value is True or value is False:
            out.append(flag if value else f"--no-{flag[2:]}")
        else:
            out += [flag, str(value)]
    return out
