"""The README's first command as a new user types it: `pip install . && tokenfan up`, then `tokenfan chat`.

A copy of this checkout (what git tracks and what it would, never ignored files) goes into a fresh virtual
environment made without the system's site-packages and without CMAKE_ARGS, so llama-cpp-python is the
build pip makes for this CPU (from pip's cache when it is warm, as a user's second try would be). Then
`tokenfan up` runs the bundled model with its embedded Redis, `tokenfan chat` answers, and Ctrl-C stops
every process `up` started.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.test_ops_cli import Output, _as_in_a_terminal
from tests.ports import free_port
from tests.procs import wait_for

ROOT = Path(__file__).resolve().parents[2]
# pip's own wait for a cold build of llama-cpp-python (about 4 minutes here) and everything else: a hang guard.
INSTALL_TIMEOUT_S = 1200


def user_env() -> dict[str, str]:
    """A shell's environment with nothing of ours in it: no tokenfan setting, no Redis, no build flags."""
    drop = ("TOKENFAN_", "REDIS_URL", "CMAKE_ARGS", "FORCE_CMAKE", "PYTHONPATH", "VIRTUAL_ENV", "PIP_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def copy_checkout(dest: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


@pytest.mark.soak
@pytest.mark.model
@pytest.mark.timeout(INSTALL_TIMEOUT_S + 300)
def test_pip_install_then_tokenfan_up_answers_a_chat_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    clone, venv = tmp_path / "tokenfan", tmp_path / "venv"
    copy_checkout(clone)
    env = user_env()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    bin_ = venv / "bin"
    install = subprocess.run([str(bin_ / "pip"), "install", "--disable-pip-version-check", "-q", "."], cwd=clone,
                             env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    up = subprocess.Popen([str(bin_ / "tokenfan"), "up", "--port", str(port)], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                          preexec_fn=_as_in_a_terminal)
    assert up.stdout is not None
    out = Output(up.stdout)
    children: list[psutil.Process] = []
    try:
        wait_for(lambda: "tokenfan is up" in out.text() or up.poll() is not None, timeout=120, what="the banner")
        assert up.poll() is None, out.text()
        children = psutil.Process(up.pid).children(recursive=True)
        assert any("redis-server" in " ".join(p.cmdline()) for p in children), out.text()
        assert "Engine check passed" in out.text(), out.text()

        chat = subprocess.run([str(bin_ / "tokenfan"), "chat", "Name a color.", "--url", base, "--max-tokens", "16"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert chat.returncode == 0, chat.stderr + out.text()
        assert chat.stdout.strip(), chat.stderr
        assert "[stop:" in chat.stderr or "[length:" in chat.stderr, chat.stderr
        assert httpx.get(f"{base}/readyz", timeout=5).status_code == 200

        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0, out.text()  # a hang guard
        out.thread.join(5)
        assert "stopping" in out.text()
        left = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, [p.cmdline() for p in left]
    finally:
        for p in children:
            try:
                p.kill()
            except psutil.Error:
                pass
        if up.poll() is None:
            up.kill()
            up.wait(10)
