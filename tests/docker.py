"""Docker for the compose tests: a daemon, the images built offline, and compose on a project of the test's own.

- The daemon: the machine's, when one answers (DOCKER_HOST or the default socket); otherwise, as root,
  a `dockerd` of the suite's own (`--iptables=false --ip-forward=false --storage-driver=vfs`, its own
  exec root, socket and pid file), stopped when the tests end. Its data root lives in the cache, so
  images and build layers outlive the run: only a cold cache pays for the builds.
- No registry is needed. The base images are debootstrapped from the Debian mirror apt uses and
  imported (Debian 12 with Python for tokenfan, Redis and Prometheus; Debian unstable for nginx, whose
  `server ... resolve` needs nginx 1.27.3 or newer). Python packages come from a wheelhouse made on
  this machine by a Python of the image's own version (environment markers such as
  `python_full_version < "3.11.3"` must read the same), pinned to the versions installed here. For
  llama-cpp-python the worker image takes the wheel pip built for the suite's own environment
  (`PIP_NO_BINARY=:none:`), so llama.cpp is compiled once per machine; where pip kept no such wheel
  the wheelhouse holds its sdist and the image compiles it, as a user's build does. Builds run with
  `--network host` (apt inside a build reaches the mirror; pip is never asked to), and with BuildKit
  where a `docker` on PATH has it (`buildkit_cli`): under vfs the classic builder copies the whole
  image for every instruction.
- Everything lasting sits under the cache folder ($XDG_CACHE_HOME or ~/.cache, then tokenfan-test):
  the base image tarballs, the wheelhouse, the daemon's data root, the build context, and
  built.json: each image's id and a digest of what built it (the same inputs again: no build at all).

`python3 -m tests.docker prepare` builds everything once (scripts/test runs it before pytest, so no
test's timeout has to hold a cold build); the tests call the same code and find it done.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
# tests/procs.py's: this module runs on the standard library alone (`bases`, before the venv exists).
LOG_DIR = ROOT / "test-artifacts" / "logs"
STANDINS = Path(__file__).resolve().parent / "compose"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokenfan-test"
MIRROR = "http://deb.debian.org/debian"
TAG = "compose-test"
# (image, Debian suite, packages beyond minbase)
BASES = {
    "python": ("tokenfan-test/base:bookworm", "bookworm", "python3,python3-venv,python3-pip,ca-certificates"),
    "sid": ("tokenfan-test/base:sid", "sid", "ca-certificates"),
}
# Stand-ins for the registry images compose.yaml names: (compose variable, image, Dockerfile, base).
STANDIN_IMAGES = [
    ("REDIS_IMAGE", "tokenfan-test/redis:local", "Dockerfile.redis", "python"),
    ("NGINX_IMAGE", "tokenfan-test/nginx:local", "Dockerfile.nginx", "sid"),
    ("PROMETHEUS_IMAGE", "tokenfan-test/prometheus:local", "Dockerfile.prometheus", "python"),
]
IMAGES = {"api": f"tokenfan-api:{TAG}", "worker": f"tokenfan-worker:{TAG}"}
# What the product's images COPY (the Dockerfiles' context, as .dockerignore leaves it).
CONTEXT = ["pyproject.toml", "README.md", ".dockerignore", "shared", "api", "worker"]
BUILD_TIMEOUT_S = 3600
# The first Docker whose CLI builds with BuildKit only through the buildx plugin.
BUILDX_REQUIRED_FROM = 23
T = TypeVar("T")
R = TypeVar("R")


class Unavailable(Exception):
    """Docker cannot run here; the message is the one line a skip shows."""


def log(msg: str) -> None:
    print(f"tests.docker: {msg}", file=sys.stderr, flush=True)


@dataclass
class Docker:
    """A daemon that answers, and the CLI pointed at it."""

    env: dict[str, str]
    own: subprocess.Popen[bytes] | None = None
    exec_root: Path | None = None
    lock: int | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 120, check: bool = True,
            cli: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([cli or docker_cli(), *args], env={**self.env, **(env or {})}, capture_output=True,
                             text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {out.returncode}: {out.stderr}")
        return out

    def import_tar(self, tarball: Path, image: str) -> None:
        with tarball.open("rb") as fh:
            out = subprocess.run([docker_cli(), "import", "-", image], env=self.env, stdin=fh,
                                 capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise AssertionError(f"docker import {tarball} failed: {out.stderr}")

    def has_image(self, image: str) -> bool:
        return self.run("image", "inspect", image, check=False).returncode == 0

    def inspect(self, *names: str) -> list[dict[str, object]]:
        found: list[dict[str, object]] = json.loads(self.run("inspect", *names).stdout)
        return found

    def stop(self) -> None:
        if self.own is not None and self.own.poll() is None:
            self.own.send_signal(signal.SIGTERM)
            try:
                self.own.wait(60)
            except subprocess.TimeoutExpired:
                self.own.kill()
                self.own.wait(10)
        if self.exec_root is not None:
            # dockerd leaves its default network namespace mounted in the exec root.
            mounts = Path("/proc/mounts").read_text().split("\n")
            for point in [m.split()[1] for m in mounts if m and m.split()[1].startswith(f"{self.exec_root}/")]:
                subprocess.run(["umount", point], capture_output=True, timeout=30)
            shutil.rmtree(self.exec_root, ignore_errors=True)
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None


def docker_cli() -> str:
    found = shutil.which("docker")
    if found is None:
        raise Unavailable("no `docker` command: install Debian's docker.io")
    return found


@functools.cache
def buildkit_cli() -> str | None:
    """A `docker` on PATH that builds with BuildKit, or None (the classic builder, then).

    Under the vfs driver the classic builder makes a container, and so a whole copy of the image's
    files, for every instruction (ENV and WORKDIR included): the API image took 323 s from scratch
    on this project's machine, and 29 s with BuildKit. BuildKit is what `docker build` runs for
    users since Docker 23. A CLI of Docker 23 or later builds with it through the buildx plugin; one
    before 23 (Debian bookworm's docker.io is 20.10) has it built in, with DOCKER_BUILDKIT=1; a
    CLI of 23 or later without buildx has neither, so every `docker` on PATH is asked in turn."""
    seen: set[Path] = set()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = Path(folder or ".") / "docker"
        if not (path.is_file() and os.access(path, os.X_OK)) or path.resolve() in seen:
            continue
        seen.add(path.resolve())
        try:
            if subprocess.run([str(path), "buildx", "version"], capture_output=True, timeout=30).returncode == 0:
                return str(path)
            version = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        m = re.search(r"version (\d+)\.", version)
        if m and int(m.group(1)) < BUILDX_REQUIRED_FROM:
            return str(path)
    return None


def _answers(env: dict[str, str]) -> bool:
    try:
        return subprocess.run([docker_cli(), "version"], env=env, capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _base_env() -> dict[str, str]:
    return {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}


def connect() -> Docker:
    """The machine's daemon if one answers, else one of our own; Unavailable says why neither."""
    env = _base_env()
    docker_cli()
    for host in filter(None, [os.environ.get("DOCKER_HOST"), "unix:///var/run/docker.sock"]):
        if host.startswith("unix://") and not Path(host[7:]).exists():
            continue
        if _answers({**env, "DOCKER_HOST": host}):
            return Docker({**env, "DOCKER_HOST": host})
    return start_daemon(env)


def start_daemon(env: dict[str, str]) -> Docker:
    dockerd = shutil.which("dockerd") or shutil.which("dockerd", path="/usr/sbin:/usr/bin")
    if dockerd is None:
        raise Unavailable("no Docker daemon answers and `dockerd` is not installed (Debian's docker.io)")
    if os.geteuid() != 0:
        raise Unavailable("no Docker daemon answers and dockerd needs root to start")
    CACHE.mkdir(parents=True, exist_ok=True)
    lock = os.open(CACHE / "docker.lock", os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise Unavailable(f"another test run's dockerd holds {CACHE / 'docker'}") from None
    # The exec root holds unix sockets: a short path under /tmp, not the cache.
    exec_root = Path(tempfile.mkdtemp(prefix="tfd-", dir="/tmp"))
    sock = exec_root / "docker.sock"
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / "dockerd.log"
    argv = [dockerd, "--iptables=false", "--ip-forward=false", "--storage-driver=vfs", "--bridge=none",
            "--data-root", str(CACHE / "docker"), "--exec-root", str(exec_root), "-H", f"unix://{sock}",
            "--pidfile", str(exec_root / "docker.pid")]
    with log_path.open("wb") as fh:
        popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    docker = Docker({**env, "DOCKER_HOST": f"unix://{sock}"}, own=popen, exec_root=exec_root, lock=lock)
    deadline = time.monotonic() + 60
    while not (sock.exists() and _answers(docker.env)):
        if popen.poll() is not None or time.monotonic() > deadline:
            docker.stop()
            lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
            raise Unavailable(f"dockerd did not start: {lines[-1] if lines else 'no output'}")
        time.sleep(0.2)
    return docker


@contextlib.contextmanager
def daemon() -> Iterator[Docker]:
    docker = connect()
    try:
        yield docker
    finally:
        docker.stop()


# --------------------------------------------------------------------------- base images


def base_image(docker: Docker, which: str) -> str:
    image, suite, include = BASES[which]
    if docker.has_image(image):
        return image
    tarball = CACHE / f"base-{suite}.tar"
    if not tarball.exists():
        debootstrap = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin")
        if debootstrap is None:
            raise Unavailable("no local base image and no `debootstrap` to make one (Debian's debootstrap)")
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"rootfs-{suite}-", dir=CACHE) as tmp:
            rootfs = Path(tmp) / "rootfs"
            out = subprocess.run([debootstrap, "--variant=minbase", f"--include={include}", suite, str(rootfs),
                                  MIRROR], capture_output=True, text=True, timeout=1800)
            if out.returncode != 0:
                raise AssertionError(f"debootstrap {suite} failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")
            # apt's downloads and lists: every image runs apt-get update before it installs anything.
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for p in (rootfs / junk).glob("*"):
                    if p.is_file():
                        p.unlink()
            partial = tarball.with_suffix(".part")
            subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True, timeout=600)
            partial.rename(tarball)
        docker.timings[f"debootstrap {suite}"] = time.monotonic() - t0
    docker.import_tar(tarball, image)
    return image


# --------------------------------------------------------------------------- wheelhouse


def image_python(docker: Docker, image: str) -> str:
    out = docker.run("run", "--rm", "--network", "none", "--entrypoint", "python3", image, "-c",
                     "import platform; print(platform.python_version())")
    return out.stdout.strip()


def python_of_version(version: str) -> str:
    """An interpreter on this machine of exactly `version`: it makes the wheelhouse."""
    major_minor = ".".join(version.split(".")[:2])
    seen: set[str] = set()
    for d in [str(Path(sys.executable).parent), *os.environ.get("PATH", "").split(os.pathsep)]:
        for name in ("python3", f"python{major_minor}"):
            path = Path(d) / name
            if not path.is_file() or str(path.resolve()) in seen:
                continue
            seen.add(str(path.resolve()))
            out = subprocess.run([str(path), "-c", "import platform; print(platform.python_version())"],
                                 capture_output=True, text=True, timeout=30)
            if out.stdout.strip() == version and subprocess.run(
                    [str(path), "-m", "pip", "--version"], capture_output=True, timeout=30).returncode == 0:
                return str(path)
    raise Unavailable(f"no Python {version} with pip on this machine to make the images' wheelhouse with")


def requirements(*extras: str) -> list[str]:
    out = subprocess.run([sys.executable, str(ROOT / "ops/docker/requirements.py"), "--pyproject",
                          str(ROOT / "pyproject.toml"), *extras], capture_output=True, text=True, check=True)
    return out.stdout.split()


def installed_pins() -> list[str]:
    """The versions this suite runs with, as constraints: the images hold what the tests test."""
    pins: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() != "tokenfan":
            pins.setdefault(name.lower(), f"{name}=={dist.version}")
    return sorted(pins.values())


def build_requires() -> list[str]:
    import tomllib

    reqs: list[str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    # llama-cpp-python's own (its sdist's pyproject.toml); the pin is the floor it names.
    return [*reqs, "scikit-build-core[pyproject]>=0.9.2"]


def wheelhouse(docker: Docker, base: str) -> Path:
    version = image_python(docker, base)
    runtime = requirements("api", "worker")
    pins = installed_pins()
    key = hashlib.sha256("\n".join([version, *runtime, *pins, *build_requires()]).encode()).hexdigest()[:16]
    house = CACHE / "wheels" / key
    if (house / ".complete").exists():
        return house
    t0 = time.monotonic()
    python = python_of_version(version)
    shutil.rmtree(house, ignore_errors=True)
    house.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as tmp:
        reqs, cons = Path(tmp, "requirements.txt"), Path(tmp, "constraints.txt")
        reqs.write_text("\n".join(runtime) + "\n")
        cons.write_text("\n".join(pins) + "\n")
        pip = [python, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "-d", str(house)]
        for argv in ([*pip, "--no-binary", "llama-cpp-python", "-c", str(cons), "-r", str(reqs)],
                     [*pip, *build_requires()]):
            out = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
            if out.returncode != 0:
                raise AssertionError(f"{' '.join(argv)}:\n{out.stderr[-3000:]}")
    sdists = [p for p in house.iterdir() if p.name.endswith((".tar.gz", ".zip"))]
    others = [p for p in sdists if not p.name.lower().startswith("llama_cpp_python")]
    if others:  # an API image has no compiler: every other package goes in as a wheel
        out = subprocess.run([python, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(house),
                              *map(str, others)], capture_output=True, text=True, timeout=1800)
        assert out.returncode == 0, out.stderr[-3000:]
        for p in others:
            p.unlink()
    (house / ".complete").write_text(version + "\n")
    docker.timings["wheelhouse"] = time.monotonic() - t0
    return house


def llama_wheel() -> Path | None:
    """The llama-cpp-python wheel pip built for this suite's environment (pip's own cache), of the
    version installed here: the worker image takes it instead of compiling llama.cpp a second time.
    None where pip kept none (a cache turned off, or a wheel that came from an index)."""
    version = importlib.metadata.version("llama-cpp-python")
    out = subprocess.run([sys.executable, "-m", "pip", "cache", "list", "llama_cpp_python", "--format=abspath"],
                         capture_output=True, text=True, timeout=60)
    found = [Path(line) for line in out.stdout.split() if Path(line).name.startswith(f"llama_cpp_python-{version}-")]
    return max(found, key=lambda p: p.stat().st_mtime) if out.returncode == 0 and found else None


# --------------------------------------------------------------------------- images


def build_context(house: Path) -> Path:
    """The files the product's Dockerfiles COPY, with the wheelhouse in ops/docker/wheels/ (hard links)."""
    ctx = CACHE / "context"
    shutil.rmtree(ctx, ignore_errors=True)
    ctx.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in CONTEXT:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, ctx / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, ctx / name)
    (ctx / "ops/docker").mkdir(parents=True)
    for src in ROOT.joinpath("ops").glob("*.py"):
        shutil.copy2(src, ctx / "ops" / src.name)
    for src in ROOT.joinpath("ops/docker").iterdir():
        if src.is_file():
            shutil.copy2(src, ctx / "ops/docker" / src.name)
    _wheels_into(ctx / "ops/docker/wheels", house)
    return ctx


def _wheels_into(wheels: Path, house: Path) -> None:
    wheels.mkdir()
    built = llama_wheel()
    for whl in house.iterdir():
        if built is not None and whl.name.startswith("llama_cpp_python-"):
            continue  # the sdist: the wheel below stands in for it
        if not whl.name.startswith("."):
            os.link(whl, wheels / whl.name)
    if built is not None:
        shutil.copy2(built, wheels / built.name)


def image_id(docker: Docker, image: str) -> str:
    out = docker.run("image", "inspect", "-f", "{{.Id}}", image, check=False)
    return out.stdout.strip() if out.returncode == 0 else ""


def _inputs(docker: Docker, context: Path, dockerfile: Path, args: dict[str, str]) -> str:
    """A digest of everything a build reads: the context's files (a wheel by its name and size: the
    wheelhouse's files are named by version and are the bulk of it), the Dockerfile, the build
    arguments and the base images' ids."""
    h = hashlib.sha256()
    for path in sorted(p for p in context.rglob("*") if p.is_file()):
        h.update(path.relative_to(context).as_posix().encode() + b"\0")
        h.update(str(path.stat().st_size).encode() if path.suffix == ".whl" else path.read_bytes())
    h.update(dockerfile.read_bytes())
    for key, value in sorted(args.items()):
        h.update(f"{key}={value}\0{image_id(docker, value) if key.endswith('_IMAGE') else ''}\0".encode())
    return h.hexdigest()


def build(docker: Docker, image: str, context: Path, dockerfile: Path, args: dict[str, str]) -> None:
    """`docker build`, skipped where this image was built from exactly these inputs and is still
    there: a build that hits the layer cache still sends its whole context to the daemon (about
    30 s for the worker's, under vfs)."""
    inputs = _inputs(docker, context, dockerfile, args)
    current = image_id(docker, image)
    if current and _stamps().get(image) == [inputs, current]:
        docker.timings[f"build {image}"] = 0.0
        return
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"build-{image.replace('/', '_').replace(':', '_')}.log"
    argv = ["build", "--network", "host", "-f", str(dockerfile), "-t", image]
    for k, v in args.items():
        argv += ["--build-arg", f"{k}={v}"]
    t0 = time.monotonic()
    cli = buildkit_cli()
    out = docker.run(*argv, str(context), timeout=BUILD_TIMEOUT_S, check=False, cli=cli,
                     env={"DOCKER_BUILDKIT": "1" if cli else "0"})
    log_path.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise AssertionError(f"building {image} failed; see {log_path}:\n{(out.stdout + out.stderr)[-3000:]}")
    docker.timings[f"build {image}"] = time.monotonic() - t0
    built = image_id(docker, image)
    with _STAMPS_LOCK:  # builds run side by side (prepare)
        stamps = _stamps()
        stamps[image] = [inputs, built]
        (CACHE / "built.json").write_text(json.dumps(stamps, indent=1))


_STAMPS_LOCK = threading.Lock()


def _stamps() -> dict[str, list[str]]:
    path = CACHE / "built.json"
    found: dict[str, list[str]] = json.loads(path.read_text()) if path.exists() else {}
    return found


def prepare(docker: Docker) -> dict[str, str]:
    """Every image the compose test runs, built (from the layer cache where nothing changed);
    returns compose.yaml's image variables for them."""
    bases = base_images(docker)
    house = wheelhouse(docker, bases["python"])
    ctx = build_context(house)
    pip = {"PYTHON_IMAGE": bases["python"], "PIP_NO_INDEX": "1"}
    # The worker takes the wheel of llama-cpp-python that pip built for this suite's environment where
    # there is one (build_context): llama.cpp is compiled once per machine, not again in the image.
    worker = {**pip, "PIP_NO_BINARY": ":none:"} if any(ctx.glob("ops/docker/wheels/llama_cpp_python-*.whl")) else pip
    # Side by side: the worker's compile of llama.cpp takes minutes on its own, while the other builds
    # mostly wait on apt and the disk.
    jobs = [(IMAGES["worker"], ctx, ctx / "ops/docker/Dockerfile.worker", worker),
            (IMAGES["api"], ctx, ctx / "ops/docker/Dockerfile.api", pip)]
    jobs += standin_jobs(bases)
    _all(lambda job: build(docker, *job), jobs)
    return {"TOKENFAN_TAG": TAG, **{var: image for var, image, _, _ in STANDIN_IMAGES}}


def standin_jobs(bases: dict[str, str]) -> list[tuple[str, Path, Path, dict[str, str]]]:
    """The builds of the stand-ins for registry images: they need the base images alone."""
    return [(image, STANDINS, STANDINS / dockerfile, {"BASE_IMAGE": bases[base]})
            for _, image, dockerfile, base in STANDIN_IMAGES]


def base_images(docker: Docker) -> dict[str, str]:
    """Every base image, the debootstraps side by side (they wait on the mirror and the disk)."""
    return dict(zip(BASES, _all(lambda which: base_image(docker, which), list(BASES)), strict=True))


def _all(fn: Callable[[T], R], args: list[T]) -> list[R]:
    """`fn` over `args` in threads; the first failure is raised once every call has ended."""
    with ThreadPoolExecutor(max_workers=len(args)) as pool:
        futures = [pool.submit(fn, a) for a in args]
    return [f.result() for f in futures]


def image_size_mb(docker: Docker, image: str) -> float:
    return int(docker.run("image", "inspect", "-f", "{{.Size}}", image).stdout) / 1e6


def main(argv: list[str]) -> int:
    """`bases`: the base and stand-in images (scripts/test runs it beside pip); `prepare`: every image."""
    if argv not in (["prepare"], ["bases"]):
        print("usage: python3 -m tests.docker prepare|bases", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    try:
        with daemon() as docker:
            if argv == ["bases"]:  # the standard library alone: scripts/test runs it while pip installs
                bases = base_images(docker)
                log(f"base images ready in {time.monotonic() - t0:.0f} s")
                _all(lambda job: build(docker, *job), standin_jobs(bases))  # apt's mirror and the disk, mostly
                log(f"stand-in images ready in {time.monotonic() - t0:.0f} s")
                return 0
            prepare(docker)
            for what, seconds in docker.timings.items():
                log(f"{what}: {seconds:.0f} s")
            for image in [*IMAGES.values(), *(i for _, i, _, _ in STANDIN_IMAGES)]:
                log(f"{image}: {image_size_mb(docker, image):.0f} MB")
    except Unavailable as exc:
        log(f"skipped: {exc}")
        return 0
    log(f"images ready in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
