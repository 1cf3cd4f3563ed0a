"""The `batch` scenario's peer: llama.cpp's own `llama-server`, built from the llama.cpp that
llama-cpp-python vendors.

The comparison is only fair if both sides run the same llama.cpp code with
the same CPU flags, so the peer is not a downloaded release: it is built
from the source distribution of the llama-cpp-python version installed
here (`pip download --no-binary :all: llama-cpp-python==<version>`), with
the CMake options llama-cpp-python's own build uses (shared libraries, no
curl, the default `GGML_NATIVE`, CPU only). The build lives in the user's
cache, one folder per version, and is reused once its binaries exist:

    $XDG_CACHE_HOME/tokenfan/sdist/llama_cpp_python-<version>/      (the unpacked source)
    $XDG_CACHE_HOME/tokenfan/llama-server/<version>/build/bin/      (llama-server, llama-batched-bench)

(`~/.cache` when XDG_CACHE_HOME is unset.) Deliberate departures:
- the Web UI is neither downloaded (`LLAMA_USE_PREBUILT_UI`, which fetches
  it from Hugging Face at build time) nor built (npm): the server then
  embeds an empty asset table, and the API routes are unchanged;
- the build runs at `nice 19` on two jobs, so a machine's other work (or
  the rest of a test run) keeps going while it compiles;
- a file lock serialises concurrent builds (a bench and a smoke test).

The scenario takes its peer as a `Peer` (`prepare`, then `start` with the
model, threads, per-stream context and slots): `LlamaServer` is the real
one; `LlamaCppPythonServer` (no build, no batching) lets the smoke test run
every other step of the scenario in seconds on a clean machine.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from tokenfan.bench.procs import BenchError, Child, Stack, child_env, progress, wait_http
from tokenfan.ops.embedded import free_port

DISTRIBUTION = "llama-cpp-python"
TARGETS = ("llama-server", "llama-batched-bench")
# Compile jobs: the two cores of a small machine, and no more, so the build never starves the rest of it.
BUILD_JOBS = 2
# Lowest CPU priority for the compiler: everything else on the machine goes first.
BUILD_NICE = 19
# What llama-cpp-python's CMakeLists.txt sets (shared libraries, no curl), CPU only, and no Web UI
# (neither fetched at build time nor built with npm). GGML_NATIVE keeps llama.cpp's default (ON), as
# a wheel built on this machine has it.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
)
STAMP = "tokenfan-build.json"


@dataclass(frozen=True)
class PeerBuild:
    """Where one llama-cpp-python version's source and llama-server build live."""

    version: str
    cache: Path

    @classmethod
    def installed(cls) -> PeerBuild:
        try:
            version = metadata.version(DISTRIBUTION)
        except metadata.PackageNotFoundError:
            raise BenchError(f"{DISTRIBUTION} is not installed: llama-server is built from its source") from None
        return cls(version, cache_root())

    @property
    def sdist_dir(self) -> Path:
        return self.cache / "sdist"

    @property
    def source(self) -> Path:
        return self.sdist_dir / f"llama_cpp_python-{self.version}" / "vendor" / "llama.cpp"

    @property
    def root(self) -> Path:
        return self.cache / "llama-server" / self.version

    @property
    def build_dir(self) -> Path:
        return self.root / "build"

    def binary(self, target: str = "llama-server") -> Path:
        return self.build_dir / "bin" / target

    def built(self) -> bool:
        """Every target is there, built with today's options (a stamp written after the build)."""
        stamp = self.root / STAMP
        try:
            recorded = json.loads(stamp.read_text())
        except (OSError, ValueError):
            return False
        return recorded.get("options") == list(CMAKE_OPTIONS) and all(self.binary(t).is_file() for t in TARGETS)

    def ensure(self) -> Path:
        """The llama-server binary, building it first (minutes) when the cache does not hold it."""
        if self.built():
            return self.binary()
        self.root.mkdir(parents=True, exist_ok=True)
        with _locked(self.root / ".lock"):
            if not self.built():  # another process may have built it while we waited
                self._fetch_source()
                self._build()
        return self.binary()

    def _fetch_source(self) -> None:
        if (self.source / "CMakeLists.txt").is_file():
            return
        self.sdist_dir.mkdir(parents=True, exist_ok=True)
        archive = self.sdist_dir / f"llama_cpp_python-{self.version}.tar.gz"
        if not archive.is_file():
            progress(f"llama-server: downloading the {DISTRIBUTION} {self.version} source distribution")
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                  "--dest", str(self.sdist_dir), f"{DISTRIBUTION}=={self.version}"], self.root / "download.log")
        if not archive.is_file():
            raise BenchError(f"pip download left no {archive.name} in {self.sdist_dir}")
        with tarfile.open(archive) as tar:
            tar.extractall(self.sdist_dir, filter="data")

    def _build(self) -> None:
        log = self.root / "build.log"
        t0 = time.monotonic()
        progress(f"llama-server: building {', '.join(TARGETS)} from {DISTRIBUTION} {self.version}'s llama.cpp "
                 f"(nice {BUILD_NICE}, {BUILD_JOBS} jobs; log in {log})")
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        _run(["cmake", "-S", str(self.source), "-B", str(self.build_dir), *generator, *CMAKE_OPTIONS], log)
        nice = ["nice", "-n", str(BUILD_NICE)] if shutil.which("nice") else []
        targets = [arg for t in TARGETS for arg in ("--target", t)]
        _run([*nice, "cmake", "--build", str(self.build_dir), "--config", "Release", "-j", str(BUILD_JOBS),
              *targets], log)
        seconds = round(time.monotonic() - t0, 1)
        (self.root / STAMP).write_text(json.dumps({"options": list(CMAKE_OPTIONS), "version": self.version,
                                                   "build_seconds": seconds}))
        progress(f"llama-server: built in {seconds}s: {self.binary()}")

    def build_seconds(self) -> float | None:
        """How long the cached build took when it was made (None: unknown)."""
        try:
            seconds = json.loads((self.root / STAMP).read_text()).get("build_seconds")
        except (OSError, ValueError):
            return None
        return float(seconds) if isinstance(seconds, (int, float)) else None


def cache_root() -> Path:
    """tokenfan's folder in the user's cache (XDG), computed at run time."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tokenfan"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(argv: list[str], log: Path) -> None:
    """Run one build step with its output appended to `log`; a failure names the step and shows the log's end."""
    if shutil.which(argv[0]) is None and not Path(argv[0]).is_file():
        raise BenchError(f"llama-server build: `{argv[0]}` is not installed (needed: cmake, a C++17 compiler)")
    with log.open("ab") as fh:
        fh.write(f"$ {' '.join(argv)}\n".encode())
        fh.flush()
        done = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise BenchError(f"llama-server build: `{' '.join(argv[:3])} …` exited {done.returncode}\n{tail}")


class Peer(Protocol):
    """The server tokenfan is measured against: one model instance serving `slots` streams at once."""

    name: str

    def prepare(self) -> dict[str, Any]:
        """Make it runnable (build it); what the results should say about it."""
        ...

    def start(self, stack: Stack, model_path: str, threads: int, n_ctx: int, slots: int) -> Child:
        """Start it with the model loaded, ready for `/v1/chat/completions` on `child.port`."""
        ...


@dataclass
class LlamaServer:
    """llama.cpp's own server, built here (the `batch` scenario's peer)."""

    build: PeerBuild = field(default_factory=PeerBuild.installed)
    name: str = "llama-server"
    binary: Path | None = None

    def prepare(self) -> dict[str, Any]:
        self.binary = self.build.ensure()
        return {"peer": self.name, "llama_cpp_python": self.build.version, "build_seconds": self.build.build_seconds(),
                "batching": True}

    def start(self, stack: Stack, model_path: str, threads: int, n_ctx: int, slots: int) -> Child:
        """`--parallel slots`, continuous batching on; llama-server's `--ctx-size` is the context of all its slots
        together, so it is `n_ctx * slots`: each stream gets the context a worker's `--n-ctx` gives one stream."""
        assert self.binary is not None, "prepare() first"
        port = free_port()
        argv = [str(self.binary), "--model", model_path, "--alias", "smollm2", "--host", "127.0.0.1",
                "--port", str(port), "--threads", str(threads), "--threads-batch", str(threads),
                "--ctx-size", str(n_ctx * slots), "--parallel", str(slots), "--cont-batching", "--no-webui"]
        child = stack.spawn(self.name, argv, child_env(stack.redis_url), python=False)
        child.port = port
        wait_http(child, "/health")  # 503 while the model loads
        return child


@dataclass
class LlamaCppPythonServer:
    """llama-cpp-python's OpenAI server (scenario 5's peer): no build, no batching (one stream at a time,
    requests wait their turn). The smoke test's stand-in: it speaks the same route, so every step of the
    scenario but the build runs in seconds on a clean machine."""

    name: str = "llama_cpp.server"

    def prepare(self) -> dict[str, Any]:
        return {"peer": self.name, "llama_cpp_python": metadata.version(DISTRIBUTION), "build_seconds": None,
                "batching": False}

    def start(self, stack: Stack, model_path: str, threads: int, n_ctx: int, slots: int) -> Child:
        return stack.llama_server(model_path, threads, n_ctx, interrupt=False)
