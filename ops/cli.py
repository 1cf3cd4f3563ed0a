"""The `tokenfan` command: up, api, worker, chat, status, keys, bench.

Settings come from `TOKENFAN_*` environment variables; a flag given on the
command line overrides its variable. The flags of `api`, `worker` and `up`
are made from the settings classes (ops/flags.py), so they cannot drift from
them, and the settings are built here, once, per tier: `up` builds both, so a
mistake in either stops it before anything starts.

A configuration mistake (a bad value, a missing model, no Redis for a tier
that needs one) is one line on stderr naming the setting, and exit code 2.
`bench` belongs to its own distribution: its arguments go to its own parser
untouched.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from tokenfan.ops.flags import Group, as_flags, options
from tokenfan.shared.errors import ConfigError, TokenfanError, Unavailable
from tokenfan.shared.settings import ApiSettings, CommonSettings, FakeEngineSettings, WorkerSettings

log = logging.getLogger("tokenfan")
# How often a starting process asks a Redis that does not answer yet.
STARTUP_RETRY_S = 0.5
F = TypeVar("F", bound=Callable[..., Any])

API = Group(ApiSettings)
WORKER = Group(WorkerSettings)
# The fake engine serves tests and the benchmark: its flags work, but stay out of the help.
FAKE = Group(FakeEngineSettings, prefix="fake", hidden=True)
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_URL = "http://127.0.0.1:8000"
# `tokenfan chat` gives up after this long without an event: a stream waiting for a worker gets `queued`
# events every second, and a dead worker's stream its takeover or its error well within it.
CHAT_TIMEOUT_S = 60.0


def _log_level(default: str = "info") -> Callable[[F], F]:
    return click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default=default,
                        show_default=True, help="how much the process logs")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _need_redis(settings: CommonSettings, command: str) -> None:
    """A Redis URL that answers: one that does not within `redis_outage_s` (Redis starting after us, as
    compose and Kubernetes may start them) is one line naming the URL, not a startup traceback."""
    if not settings.redis_url:
        raise ConfigError(f"TOKENFAN_REDIS_URL (or REDIS_URL) is not set: `tokenfan {command}` needs a Redis "
                          "(`tokenfan up` starts one of its own)")
    import redis

    from tokenfan.shared.redisconn import redacted, sync_client

    client = sync_client(settings.redis_url, cluster=settings.redis_cluster)
    deadline = time.monotonic() + settings.redis_outage_s
    said = False
    try:
        while True:
            try:
                client.ping()
                return
            except redis.AuthenticationError as exc:
                raise ConfigError(f"REDIS_URL: Redis at {redacted(settings.redis_url)} refused the password: "
                                  f"{exc}") from None
            except redis.RedisError as exc:
                if time.monotonic() > deadline:
                    raise Unavailable(f"cannot reach Redis at {redacted(settings.redis_url)} (REDIS_URL) after "
                                      f"{settings.redis_outage_s:g}s (TOKENFAN_REDIS_OUTAGE_S): {exc}") from None
                if not said:
                    logging.getLogger(__name__).warning(
                        "tokenfan %s: Redis at %s does not answer (%s); waiting up to %gs", command,
                        redacted(settings.redis_url), exc, settings.redis_outage_s)
                    said = True
                time.sleep(STARTUP_RETRY_S)
    finally:
        client.close()


@click.group(help=__doc__.split("\n\n")[0], context_settings={"max_content_width": 120})
def cli() -> None:
    pass


@cli.command(help="Redis (embedded unless REDIS_URL is set), one worker and the API")
@options(API, WORKER, FAKE)
@_log_level()
def up(log_level: str, **params: Any) -> int:
    from tokenfan.ops.up import run_up

    _setup_logging(log_level)
    api, worker = API.build(params), WORKER.build(params)
    FAKE.build(params)  # checked here; the worker builds its own from the same flags
    common = ["--log-level", log_level]
    return run_up(api, worker, [*common, *as_flags(WORKER, params), *as_flags(FAKE, params)],
                  [*common, *as_flags(API, params)])


@cli.command(help="run an API process")
@options(API)
@_log_level()
def api(log_level: str, **params: Any) -> int:
    from tokenfan.ops.serve import serve_api

    _setup_logging(log_level)
    settings = API.build(params)
    _need_redis(settings, "api")
    return serve_api(settings)


@cli.command(help="run a worker process")
@options(WORKER, FAKE)
@_log_level()
def worker(log_level: str, **params: Any) -> int:
    from tokenfan.worker.engines import model_file
    from tokenfan.worker.main import run_worker

    _setup_logging(log_level)
    settings = WORKER.build(params)
    fake = FAKE.build(params) if settings.engine == "fake" else None
    if fake is None:
        model_file(settings)  # every configuration mistake before waiting for Redis
    _need_redis(settings, "worker")
    return run_worker(settings, fake)


@cli.command(help="stream an answer in the terminal")
@click.argument("prompt")
@click.option("--url", default=DEFAULT_URL, show_default=True, help="tokenfan API")
@click.option("--model", help="model to ask (default: the API's first)")
@click.option("--max-tokens", type=int, default=256, show_default=True, help="longest answer in tokens")
@click.option("--api-key", help="bearer key (default: TOKENFAN_API_KEY)")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=CHAT_TIMEOUT_S, show_default=True,
              help="seconds without an event (API unreachable, stream stalled) before giving up")
def chat(**params: Any) -> int:
    from tokenfan.ops.chat import run_chat

    _setup_logging("warning")
    return run_chat(argparse.Namespace(**params))


@cli.command(help="models, queues, workers, streams and errors")
@click.option("--url", default=DEFAULT_URL, show_default=True, help="tokenfan API")
@click.option("--api-key", help="admin bearer key (default: TOKENFAN_API_KEY)")
def status(**params: Any) -> int:
    from tokenfan.ops.status import run_status

    _setup_logging("warning")
    return run_status(argparse.Namespace(**params))


@cli.group(help="manage API keys (in Redis, or in a file with --file)")
@options(Group(CommonSettings).only("redis_url"))
@click.option("--file", help="a JSON key file (TOKENFAN_API_KEYS_FILE) instead of Redis")
@_log_level("warning")
@click.pass_context
def keys(ctx: click.Context, /, log_level: str, file: str | None, **params: Any) -> None:
    _setup_logging(log_level)
    ctx.obj = {"file": file, "params": params}


def _keys_run(ctx: click.Context, command: str, **args: Any) -> int:
    from tokenfan.ops import keys as keys_

    file = ctx.obj["file"]
    # The key file needs no Redis: only a Redis store reads the Redis settings.
    redis_url = None if file else Group(CommonSettings).only("redis_url").build(ctx.obj["params"]).redis_url
    return keys_.run(argparse.Namespace(keys_command=command, file=file, **args), redis_url)


@keys.command("add", help="create a key; it is printed once and stored only as a hash")
@click.argument("tenant")
@click.option("--admin", is_flag=True, help="may read /ops and /metrics")
@click.option("--max-concurrent", type=int, default=8, show_default=True, help="concurrent streams")
@click.option("--rpm", type=int, default=120, show_default=True, help="requests per minute")
@click.pass_context
def keys_add(ctx: click.Context, /, **args: Any) -> int:
    return _keys_run(ctx, "add", **args)


@keys.command("list", help="list keys (hash prefix, tenant, limits, state)")
@click.pass_context
def keys_list(ctx: click.Context, /) -> int:
    return _keys_run(ctx, "list")


@keys.command("revoke", help="revoke a key by its hash prefix (from `list`) or the key itself")
@click.argument("key")
@click.pass_context
def keys_revoke(ctx: click.Context, /, key: str) -> int:
    return _keys_run(ctx, "revoke", key=key)


@cli.command(help="measure relay overhead, capacity, TTFT and end-to-end speed (`tokenfan bench --help`)",
             context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> int:
    try:
        from tokenfan.bench import main as bench_main
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("tokenfan.bench"):
            raise
        print("tokenfan: the benchmark is not installed: pip install ./bench", file=sys.stderr)
        return 2
    return bench_main.main(list(args))


def main(argv: list[str] | None = None) -> int:
    try:
        rv = cli.main(args=argv, prog_name="tokenfan", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except TokenfanError as exc:
        print(f"tokenfan: {exc.message}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, click.Abort):
        return 130
    return rv if isinstance(rv, int) else 0
