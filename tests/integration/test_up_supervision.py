"""A user's first hour: `tokenfan up` names and restarts what dies, a worker proves its engine before it takes
a job, `tokenfan chat` gives up in a bounded time, and a bad repack value or model file is one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest

from tests.integration.test_ops_cli import Output, _as_in_a_terminal, clean_env, tokenfan
from tests.ports import free_port
from tests.procs import Cluster, assert_whole, create_stream, expected_text, read_stream, token_text, wait_for
from tokenfan.ops import up as up_module


class Up:
    """`tokenfan up` with the fake engine on a free port, its output collected, every process it made killed
    at the end whatever happened."""

    def __init__(self, *flags: str, **env: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokenfan.ops", "up", "--engine", "fake", "--port", str(self.port),
             "--metrics-port", "0", *flags],
            env={**clean_env(), **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_as_in_a_terminal)
        assert self.proc.stdout is not None
        self.out = Output(self.proc.stdout)
        self.seen: dict[int, psutil.Process] = {}

    def children(self) -> list[psutil.Process]:
        try:
            found = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []
        self.seen.update((p.pid, p) for p in found)
        return found

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.out.text()
        try:
            return httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self) -> None:
        wait_for(self.ready, timeout=90, what="tokenfan up ready")

    def worker(self) -> psutil.Process | None:
        return next((p for p in self.children() if "tokenfan.ops worker" in " ".join(_cmdline(p))), None)

    def close(self) -> None:
        self.children()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for p in self.seen.values():
            try:
                p.kill()
            except psutil.Error:
                pass

    def strays(self) -> list[str]:
        return [" ".join(_cmdline(p)) for p in self.seen.values()
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


class RawOutput(Output):
    """Output as it comes, not by lines: `tokenfan chat` writes an answer without a newline until its end."""

    def _pump(self, stream: Any) -> None:
        while chunk := os.read(stream.fileno(), 4096):
            with self.lock:
                self.chunks.append(chunk)


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


@pytest.fixture
def make_up() -> Iterator[type[Up]]:
    made: list[Up] = []

    class Tracked(Up):
        def __init__(self, *flags: str, **env: str) -> None:
            super().__init__(*flags, **env)
            made.append(self)

    yield Tracked
    for u in made:
        u.close()


def test_up_names_a_worker_that_crashes_at_start_restarts_it_and_gives_up_after_the_limit(
        make_up: type[Up]) -> None:
    up = make_up("--fake-crash-at-start", "segv")
    deadline = 60 + sum(up_module.backoff(n) for n in range(1, up_module.RESTART_LIMIT))  # a hang guard only
    code = up.proc.wait(deadline)
    up.out.thread.join(5)
    text = up.out.text()
    assert code == 1, text
    assert text.count("tokenfan: the worker exited with SIGSEGV; restarting it in") == up_module.RESTART_LIMIT - 1, text
    assert text.count("tokenfan: starting the worker again") == up_module.RESTART_LIMIT - 1, text
    assert (f"tokenfan: the worker exited {up_module.RESTART_LIMIT} times in a row, each soon after its start "
            "(last: SIGSEGV); not restarting it; stopping") in text, text
    assert "TOKENFAN_CPU_REPACK=off" in text  # the worker's own line before its check names the setting
    assert "Traceback" not in text
    assert not up.strays(), up.strays()


def test_up_stops_at_once_when_the_worker_fails_its_engine_check(make_up: type[Up]) -> None:
    up = make_up("--fake-crash-at-start", "error")
    code = up.proc.wait(60)  # a hang guard only
    up.out.thread.join(5)
    text = up.out.text()
    assert code == 1, text
    assert ("tokenfan: the fake engine failed its start-up check (the fake engine failed its start-up check as "
            "configured); on a CPU where llama.cpp's repacked or AMX kernels fail, set TOKENFAN_CPU_REPACK=off") in text
    assert "tokenfan: the worker stopped on a configuration mistake (exit code 2; its line is above); stopping" in text
    assert "restarting" not in text and "Traceback" not in text, text
    assert not up.strays(), up.strays()


def test_up_restarts_a_worker_that_dies_mid_stream_and_the_stream_goes_on(make_up: type[Up]) -> None:
    up = make_up("--fake-rate", "20", TOKENFAN_KEEPER_INTERVAL_S="0.25", TOKENFAN_LEASE_TTL_S="1.5")
    up.wait_ready()
    first = up.worker()
    assert first is not None
    prompt = "a crash in the middle"
    sid = create_stream(up.base, prompt, max_tokens=60)  # three seconds at 20 tokens/s
    _, before = read_stream(up.base, sid, stop_after=8)
    first.send_signal(signal.SIGSEGV)
    wait_for(lambda: "tokenfan: the worker exited with SIGSEGV; restarting it in" in up.out.text(), timeout=10,
             what="up to name the signal")
    wait_for(lambda: (w := up.worker()) is not None and w.pid != first.pid, timeout=30, what="a new worker")
    status, evs = read_stream(up.base, sid, timeout=60)
    assert status == 200
    assert_whole([e for e in evs if e.event != "queued"])
    assert evs[-1].event == "done", evs[-1]
    assert token_text(evs) == expected_text(prompt, 60)
    assert len(before) >= 8
    up.proc.send_signal(signal.SIGINT)
    assert _stopped(up) == 0, up.out.text()
    assert not up.strays(), up.strays()


def _stopped(up: Up) -> int:
    """`tokenfan up`'s exit code after a Ctrl-C; what it said and what still runs if it did not stop."""
    try:
        return up.proc.wait(up_module.STOP_TIMEOUT_S + 10)  # its children's stop, bounded by up itself
    except subprocess.TimeoutExpired:
        raise AssertionError(f"tokenfan up did not stop; still running: {up.strays()}\n{up.out.text()}") from None


def test_chat_gives_up_when_the_api_dies_mid_stream(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker(TOKENFAN_FAKE_RATE="5", TOKENFAN_FAKE_TOKENS="200")  # forty seconds
    prompt = "an api that dies"
    chat = subprocess.Popen([sys.executable, "-m", "tokenfan.ops", "chat", prompt, "--url", api.url, "--max-tokens",
                             "200", "--timeout", "3"], env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    assert chat.stdout is not None and chat.stderr is not None
    out, err = RawOutput(chat.stdout), Output(chat.stderr)
    try:
        wait_for(lambda: len(out.text()) > len(prompt), timeout=30, what="the first words")
        api.signal(signal.SIGKILL)
        killed = time.monotonic()
        code = chat.wait(30)  # a hang guard: the bound itself is checked on the line below
        err.thread.join(5)
        assert code == 1, err.text()
        assert f"no event from the API at {api.url} for 3s (--timeout); giving up on stream" in err.text(), err.text()
        assert "Traceback" not in err.text()
        assert time.monotonic() - killed >= 3  # it did retry for its whole bound first
        assert expected_text(prompt, 200).startswith(out.text())
    finally:
        if chat.poll() is None:
            chat.kill()
            chat.wait(5)


@pytest.mark.parametrize(("args", "env", "named"), [
    (["--cpu-repack", "maybe"], {}, "--cpu-repack"),
    ([], {"TOKENFAN_CPU_REPACK": "sometimes"}, "TOKENFAN_CPU_REPACK"),
], ids=["flag", "variable"])
def test_an_invalid_repack_value_is_one_line_naming_it(args: list[str], env: dict[str, str], named: str) -> None:
    res = tokenfan("worker", *args, env={**clean_env(), **env})
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith(f"tokenfan: {named}: Input should be 'auto', 'on' or 'off'"), res.stderr
    assert res.stderr.count("\n") == 1, res.stderr


def test_a_model_file_llama_cpp_refuses_is_one_line_naming_it(redis_url: str, tmp_path: object) -> None:
    bad = f"{tmp_path}/broken.gguf"
    with open(bad, "wb") as fh:
        fh.write(b"NOTAGGUF" * 512)
    res = tokenfan("worker", "--model-path", bad, "--metrics-port", "0", "--redis-url", redis_url, timeout=60)
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tokenfan: TOKENFAN_MODEL_PATH: llama.cpp cannot load {bad}: "), res.stderr
    assert "invalid magic" in last, last
    assert "Traceback" not in res.stderr and "WARNING" not in res.stderr, res.stderr


@pytest.mark.parametrize(("child", "named"), [("tokenfan.ops api", "API"), ("redis-server", "embedded Redis")])
def test_up_restarts_the_api_and_the_embedded_redis_when_they_die(make_up: type[Up], child: str, named: str) -> None:
    up = make_up()
    up.wait_ready()
    victim = next(p for p in up.children() if child in " ".join(_cmdline(p)))
    victim.kill()
    wait_for(lambda: f"tokenfan: the {named} exited with SIGKILL; restarting it in" in up.out.text(), timeout=10,
             what=f"up to name the {named}'s exit")
    wait_for(lambda: f"tokenfan: starting the {named} again" in up.out.text(), timeout=10, what="the restart")
    wait_for(up.ready, timeout=60, what="ready again")
    prompt = f"after the {named} came back"
    resp = httpx.post(f"{up.base}/v1/chat/completions", timeout=30,
                      json={"messages": [{"role": "user", "content": prompt}], "max_tokens": 5})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == expected_text(prompt, 5)
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(30) == 0, up.out.text()
    assert not up.strays(), up.strays()
