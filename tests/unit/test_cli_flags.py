"""The `tokenfan` command's flags are the settings' fields: one flag per field, the field's
description as its help, the field's default shown; a flag wins over its variable; the fake
engine's knobs are accepted but not listed; `bench` gets its arguments untouched."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from tokenfan.ops import cli
from tokenfan.ops.flags import Group, as_flags
from tokenfan.shared import defaults as d
from tokenfan.shared.errors import ConfigError
from tokenfan.shared.settings import ApiSettings, CommonSettings, FakeEngineSettings, WorkerSettings

COMMANDS = {"api": (ApiSettings,), "worker": (WorkerSettings,), "up": (ApiSettings, WorkerSettings)}


def options_of(command: str) -> dict[str, click.Option]:
    cmd = cli.cli.commands[command]
    return {p.name: p for p in cmd.params if isinstance(p, click.Option) and p.name}


def help_of(command: str) -> str:
    res = CliRunner().invoke(cli.cli, [command, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_setting_of_the_tier_is_a_flag_with_its_description(command: str) -> None:
    opts = options_of(command)
    fields = {f: info for cls in COMMANDS[command] for f, info in cls.model_fields.items()}
    for field, info in fields.items():
        assert info.description, f"{field} has no description"
        opt = opts[field]
        assert opt.opts[0] == "--" + field.replace("_", "-")
        assert opt.help == info.description
        assert not opt.hidden
    other = {"log_level"} | {f"fake_{f}" for f in FakeEngineSettings.model_fields}
    assert set(opts) - other == set(fields), "a flag that is no setting of this tier"


def test_api_and_worker_flags_stay_apart() -> None:
    assert "engine" not in options_of("api") and "n_ctx" not in options_of("api")
    assert "port" not in options_of("worker") and "max_queue" not in options_of("worker")
    assert "slots" in options_of("worker")


def test_help_shows_the_fields_default_and_variable() -> None:
    out = help_of("api")
    port = next(line for line in out.splitlines() if line.strip().startswith("--port "))
    assert f"[env var: TOKENFAN_PORT; default: {d.API_PORT}]" in port
    url = next(line for line in out.splitlines() if line.strip().startswith("--redis-url "))
    assert "env var: TOKENFAN_REDIS_URL, REDIS_URL" in url
    assert "default" not in url.split("[")[-1]  # none: the description says what happens without it


@pytest.mark.parametrize("command", ["worker", "up"])
def test_fake_engine_flags_are_accepted_but_not_listed(command: str) -> None:
    opts = options_of(command)
    assert {f"fake_{f}" for f in FakeEngineSettings.model_fields} <= set(opts)
    assert all(opts[f"fake_{f}"].hidden for f in FakeEngineSettings.model_fields)
    assert "fake" not in help_of(command).replace("[llama|fake]", "").replace("the deterministic fake", "")


def test_production_settings_hold_no_fake_engine_knob() -> None:
    for cls in (CommonSettings, ApiSettings, WorkerSettings):
        assert not [f for f in cls.model_fields if f.startswith("fake")], cls


def test_a_flag_wins_over_its_variable_and_the_variable_over_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENFAN_N_CTX", "999")
    monkeypatch.setenv("TOKENFAN_SLOTS", "7")
    worker = Group(WorkerSettings)
    s = worker.build({"n_ctx": "512", "slots": None})
    assert (s.n_ctx, s.slots, s.model) == (512, 7, d.MODEL_NAME)


def test_fake_engine_settings_keep_their_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENFAN_FAKE_RATE", "7.5")
    monkeypatch.setenv("TOKENFAN_FAKE_FAIL_AFTER", "3")
    fake = Group(FakeEngineSettings, prefix="fake").build({"fake_tokens": "9"})
    assert (fake.rate, fake.tokens, fake.fail_after, fake.prefill_s) == (7.5, 9, 3, 0.0)


def test_a_bad_flag_or_variable_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    api = Group(ApiSettings)
    with pytest.raises(ConfigError) as flag:
        api.build({"port": "eighty"})
    assert flag.value.message.startswith("--port: ") and "'eighty'" in flag.value.message
    monkeypatch.setenv("TOKENFAN_MAX_QUEUE", "lots")
    with pytest.raises(ConfigError) as env:
        api.build({})
    assert env.value.message.startswith("TOKENFAN_MAX_QUEUE: ") and "\n" not in env.value.message


def test_flags_written_out_again_for_a_child_build_the_same_settings() -> None:
    worker = Group(WorkerSettings)
    params: dict[str, Any] = {"n_ctx": "512", "redis_cluster": True, "engine": "fake", "model": None}
    flags = as_flags(worker, params)
    assert flags == ["--redis-cluster", "--engine", "fake", "--n-ctx", "512"]
    ctx = cli.cli.commands["worker"].make_context("worker", flags)
    assert worker.build(ctx.params) == worker.build(params)


def test_bench_gets_its_arguments_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenfan.bench import main as bench_main

    seen: list[list[str]] = []
    monkeypatch.setattr(bench_main, "main", lambda argv: seen.append(argv) or 0)
    args = ["relay", "--quick", "--threads", "2", "--out", "x.md", "--help"]
    assert cli.main(["bench", *args]) == 0
    assert seen == [args]


def test_bench_not_installed_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "tokenfan.bench", None)
    assert cli.main(["bench", "--quick"]) == 2
    assert capsys.readouterr().err == "tokenfan: the benchmark is not installed: pip install ./bench\n"


def test_the_configuration_doc_lists_every_setting_and_no_other() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"`((?:TOKENFAN_[A-Z0-9_]+)|REDIS_URL)`", doc))
    groups = [Group(ApiSettings), Group(WorkerSettings), Group(FakeEngineSettings, prefix="fake")]
    read = {env for g in groups for f, _ in g.fields() for env in g.envs(f)}
    # The client commands (chat, status) read their key from the environment themselves: no server setting.
    clients = Path(__file__).resolve().parents[2] / "ops"
    own = r'environ\.get\("(TOKENFAN_[A-Z0-9_]+)"'
    read |= {m for p in clients.glob("*.py") for m in re.findall(own, p.read_text())}
    assert read - documented == set(), "settings missing from docs/configuration.md"
    assert documented - read == set(), "docs/configuration.md names variables no setting reads"
