"""compose.yaml for real: the images built offline, the stack up on a real Docker daemon, scaled and broken.

Two API replicas behind nginx, two CPU workers with the bundled SmolLM2, Redis with its AOF and
Prometheus, on a compose project, network and volumes of the test's own, the proxy published on a
loopback port only. Grafana is not run (no Debian package; its queries run against a real Prometheus
in tests/e2e/test_prometheus.py). Registry images are replaced by local stand-ins through compose's
image variables (tests/compose/, tests/docker.py); the tokenfan images are the repository's own
Dockerfiles, built with no index and a wheelhouse.

The tests run in file order on one stack: each leaves it as the next expects (three workers and three
API replicas once scaled). Where no Docker daemon answers and none can start, every test but the
compose file's own check skips with one line naming why.
"""

from __future__ import annotations

import importlib.metadata
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests import docker as dk
from tests.ports import free_port
from tests.procs import LOG_DIR, SSE, assert_whole, create_stream, read_stream, sse_events, token_text, wait_for

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ["redis", "api", "proxy", "worker-cpu", "prometheus"]
PROMPT = "Write one sentence about the sea."
LONG_PROMPT = "Count from 1 to 200, separated by commas."
COMPILERS = "gcc cc c++ g++ clang cmake make"


def compose_cli() -> list[str]:
    found = shutil.which("docker-compose")
    if found:
        return [found]
    return [dk.docker_cli(), "compose"]


@dataclass
class Stack:
    docker: dk.Docker
    project: str
    env_file: Path
    port: int
    password: str
    down_done: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        argv = [*compose_cli(), "-p", self.project, "-f", str(ROOT / "compose.yaml"), "--env-file",
                str(self.env_file), "--profile", "cpu", *args]
        out = subprocess.run(argv, env=self.docker.env, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"{' '.join(args)}: {out.stdout}{out.stderr}"
        return out

    def up(self, api: int, workers: int) -> None:
        self.compose("up", "-d", "--no-build", "--no-recreate", "--scale", f"api={api}", "--scale",
                     f"worker-cpu={workers}", *SERVICES)

    def containers(self, service: str, running: bool = True) -> list[str]:
        argv = ["ps", "-q", "--filter", f"label=com.docker.compose.project={self.project}",
                "--filter", f"label=com.docker.compose.service={service}"]
        ids = self.docker.run(*argv, *([] if running else ["-a"])).stdout.split()
        return sorted(ids)

    def ip(self, cid: str) -> str:
        nets = self.docker.inspect(cid)[0]["NetworkSettings"]["Networks"]  # type: ignore[index]
        return str(next(iter(nets.values()))["IPAddress"])  # type: ignore[union-attr]

    def health(self, cid: str) -> str:
        state = self.docker.inspect(cid)[0]["State"]
        return str(state.get("Health", {}).get("Status", "none"))  # type: ignore[union-attr]

    def all_healthy(self, *services: str) -> bool:
        return all(self.health(c) == "healthy" for s in services for c in self.containers(s))

    def exec(self, cid: str, *argv: str) -> str:
        return self.docker.run("exec", cid, *argv, timeout=60).stdout

    def redis_cli(self, *argv: str) -> str:
        (redis,) = self.containers("redis")
        return self.exec(redis, "redis-cli", "--no-auth-warning", *argv).strip()

    def serving_worker(self, sid: str) -> str:
        """The worker container holding a stream: workers are named after their host (the container id)."""
        name = self.redis_cli("HGET", f"tf:stream:{{{sid}}}:state", "worker")
        found = [c for c in self.containers("worker-cpu", running=False) if name.startswith(c[:12])]
        return found[0] if found else ""

    def proxy_log(self) -> str:
        (proxy,) = self.containers("proxy")
        return self.docker.run("logs", proxy).stdout

    def upstreams(self, path: str) -> list[str]:
        lines = [ln for ln in self.proxy_log().splitlines() if f" {path} " in ln]
        return [m[1] for ln in lines if (m := re.search(r" up=([\d.]+):8000", ln))]

    def save_logs(self, name: str) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        out = subprocess.run([*compose_cli(), "-p", self.project, "-f", str(ROOT / "compose.yaml"), "--env-file",
                              str(self.env_file), "--profile", "cpu", "logs", "--no-color"], env=self.docker.env,
                             capture_output=True, text=True, timeout=120)
        (LOG_DIR / f"{name}.compose.log").write_text(out.stdout + out.stderr)

    def down(self) -> None:
        if not self.down_done:
            self.compose("down", "-v", "--remove-orphans", "--timeout", "5")
            self.down_done = True

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        found = []
        for kind in (["ps", "-a", "-q"], ["network", "ls", "-q"], ["volume", "ls", "-q"]):
            found += self.docker.run(*kind, "--filter", label).stdout.split()
        found += [n for n in self.docker.run("network", "ls", "--format", "{{.Name}}").stdout.split()
                  if n.startswith(f"{self.project}_")]
        return found


pytestmark = pytest.mark.docker

@pytest.fixture(scope="module")
def docker() -> Iterator[dk.Docker]:
    try:
        d = dk.connect()
    except dk.Unavailable as exc:
        pytest.skip(f"no Docker here: {exc}")
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def images(docker: dk.Docker) -> dict[str, str]:
    try:
        return dk.prepare(docker)
    except dk.Unavailable as exc:
        pytest.skip(f"the images cannot be built here: {exc}")


@pytest.fixture(scope="module")
def stack(docker: dk.Docker, images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    project = f"tfcompose{secrets.token_hex(3)}"
    password = secrets.token_hex(16)
    port = free_port()
    values = {
        **images,
        "REDIS_PASSWORD": password,
        "GRAFANA_ADMIN_PASSWORD": secrets.token_hex(8),
        "HTTP_PORT": f"127.0.0.1:{port}",
        "API_REPLICAS": "2",
        "WORKER_REPLICAS": "2",
        "TOKENFAN_THREADS": "1",
    }
    env_file = tmp_path_factory.mktemp("compose") / "env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    s = Stack(docker, project, env_file, port, password)
    try:
        s.up(api=2, workers=2)
        wait_for(lambda: s.all_healthy(*SERVICES[:4]), timeout=170, interval=1,
                 what="every container healthy")
        yield s
    finally:
        try:
            if not s.down_done:
                s.save_logs(project)
        finally:
            s.down()


# --------------------------------------------------------------------------- the file and the images


def test_compose_file_is_read_by_this_compose(tmp_path: Path) -> None:
    """`config` with every variable compose needs: the file parses, interpolates, and names every image."""
    env = tmp_path / "env"
    env.write_text("REDIS_PASSWORD=x\nGRAFANA_ADMIN_PASSWORD=y\nNGINX_IMAGE=local/nginx:1\n")
    try:
        cli = compose_cli()
    except dk.Unavailable as exc:
        pytest.skip(str(exc))
    out = subprocess.run([*cli, "-f", str(ROOT / "compose.yaml"), "--env-file", str(env), "--profile", "cpu",
                          "--profile", "gpu", "config"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "image: local/nginx:1" in out.stdout
    assert "${" not in out.stdout.replace("$${", ""), "an interpolation compose left unexpanded"
    assert "TOKENFAN_MODEL: smollm2" in out.stdout


@pytest.mark.timeout(dk.BUILD_TIMEOUT_S)
def test_images_build_offline_and_hold_only_their_tier(docker: dk.Docker, images: dict[str, str]) -> None:
    api, worker = dk.IMAGES["api"], dk.IMAGES["worker"]
    sizes = {i: dk.image_size_mb(docker, i) for i in [api, worker, *(v for k, v in images.items() if "IMAGE" in k)]}
    (LOG_DIR / "compose-images.txt").write_text("".join(f"{i} {mb:.0f} MB\n" for i, mb in sizes.items()))
    # One container an image (under vfs each one copies its image's layers: about 20 s for the worker's).
    probe = "import importlib.util as u, os, shutil; print(os.getuid()); print(u.find_spec('llama_cpp') is not None, " \
            f"[c for c in {COMPILERS.split()!r} if shutil.which(c)])"
    model = "; from tokenfan.worker.engines import bundled_model_path as p; print(p().stat().st_size)"
    for image, has_llama in ((api, False), (worker, True)):
        config = docker.inspect(image)[0]["Config"]
        assert config["User"] not in ("", "root", "0"), f"{image} runs as root"  # type: ignore[index]
        out = docker.run("run", "--rm", "--network", "none", "--entrypoint", "python", image, "-c",
                         probe + (model if has_llama else "")).stdout.split("\n")
        assert out[0] != "0", f"{image}: uid 0"
        # the API image: no llama_cpp to import at all (find_spec finds no such module)
        assert out[1] == f"{has_llama} []", f"{image}: llama_cpp, compilers: {out[1]}"
        if has_llama:
            assert int(out[2]) > 50_000_000, "the bundled model"
    # The worker's llama-cpp-python is the one this suite runs: the wheel pip built for this environment
    # where pip kept it (tests/docker.py), else compiled in the image from the one sdist in its context.
    version = importlib.metadata.version("llama-cpp-python")
    got = docker.run("run", "--rm", "--network", "none", "--entrypoint", "python", worker, "-c",
                     "import importlib.metadata as m; print(m.version('llama-cpp-python'))").stdout.strip()
    assert got == version
    shipped = [p.name for p in (dk.CACHE / "context/ops/docker/wheels").glob("llama_cpp_python-*")]
    wheel = dk.llama_wheel()
    assert shipped == ([wheel.name] if wheel else [f"llama_cpp_python-{version}.tar.gz"]), shipped


# --------------------------------------------------------------------------- the stack


def test_every_container_is_healthy_and_prometheus_finds_every_process(stack: Stack) -> None:
    assert len(stack.containers("api")) == 2 and len(stack.containers("worker-cpu")) == 2
    assert stack.all_healthy("redis", "api", "proxy", "worker-cpu")
    assert stack.redis_cli("CONFIG", "GET", "appendonly").split() == ["appendonly", "yes"]
    (prom,) = stack.containers("prometheus")
    query = ("import json, urllib.request; t = json.load(urllib.request.urlopen("
             "'http://127.0.0.1:9090/api/v1/targets'))['data']['activeTargets']; "
             "print(sorted((x['labels']['job'], x['health']) for x in t))")

    def scraped() -> bool:
        targets = stack.exec(prom, "python3", "-c", query)
        return targets.count("'tokenfan-api', 'up'") == 2 and targets.count("'tokenfan-worker', 'up'") == 2

    wait_for(scraped, timeout=90, interval=1, what="Prometheus scraping 2 API replicas and 2 workers")
    for cid in stack.containers("api") + stack.containers("worker-cpu"):
        assert stack.exec(cid, "id", "-u").strip() != "0"


def test_a_streamed_chat_arrives_token_by_token_with_exact_text(stack: Stack) -> None:
    sid = create_stream(stack.url, PROMPT, max_tokens=40, temperature=0)
    chunks: list[bytes] = []
    with httpx.stream("GET", f"{stack.url}/v1/streams/{sid}", timeout=httpx.Timeout(120)) as resp:
        assert resp.status_code == 200
        for chunk in resp.iter_raw():
            chunks.append(chunk)
            if b"event: done" in chunk or b"event: error" in chunk:
                break
    body = b"".join(chunks)
    evs = [e for e in sse_events(httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body))
           if e.event != "queued"]
    assert_whole(evs)
    assert evs[-1].event == "done", evs[-1]
    tokens = [e for e in evs if e.event == "token"]
    assert len(tokens) >= 10
    # A buffering proxy hands the whole answer over in one or two reads; nginx here, each event as it comes.
    with_tokens = sum(b"event: token" in c for c in chunks)
    assert with_tokens >= len(tokens) // 2, f"{len(tokens)} tokens in {with_tokens} reads"
    # Greedy decoding: the same answer, whole, from the OpenAI route through the proxy.
    resp = httpx.post(f"{stack.url}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 40, "temperature": 0})
    assert resp.status_code == 200, resp.text
    assert token_text(evs) == resp.json()["choices"][0]["message"]["content"]


def test_resume_through_the_proxy_lands_on_either_replica(stack: Stack) -> None:
    sid = create_stream(stack.url, PROMPT, max_tokens=30, temperature=0)
    status, first = read_stream(stack.url, sid, stop_after=6, timeout=120)
    assert status == 200
    first = [e for e in first if e.event != "queued"]
    last = int(first[-1].id)
    _, whole = read_stream(stack.url, sid, timeout=120)
    whole = [e for e in whole if e.event != "queued"]
    assert_whole(whole)
    replicas = {stack.ip(c) for c in stack.containers("api")}
    deadline = time.monotonic() + 60
    while set(stack.upstreams(f"/v1/streams/{sid}")) < replicas:
        assert time.monotonic() < deadline, stack.upstreams(f"/v1/streams/{sid}")
        _, rest = read_stream(stack.url, sid, last=last, timeout=60)
        assert [e.id for e in rest] == [e.id for e in whole[last:]]
        assert token_text(first) + token_text(rest) == token_text(whole)


def test_a_third_worker_takes_jobs(stack: Stack) -> None:
    before = set(stack.containers("worker-cpu"))
    stack.up(api=2, workers=3)
    (new,) = set(stack.containers("worker-cpu")) - before
    wait_for(lambda: stack.health(new) == "healthy", timeout=170, interval=1, what="the third worker healthy")
    assert set(stack.containers("worker-cpu")) > before, "the first two kept running"

    def one_round() -> bool:
        sids = [create_stream(stack.url, f"Say hello number {n}.", max_tokens=6) for n in range(3)]
        for sid in sids:
            _, evs = read_stream(stack.url, sid, timeout=120)
            assert evs and evs[-1].event == "done", evs[-1:]
        return any(stack.serving_worker(sid) == new for sid in sids)

    wait_for(one_round, timeout=150, interval=0, what="a job on the third worker")


def test_a_third_api_replica_gets_traffic(stack: Stack) -> None:
    before = set(stack.containers("api"))
    stack.up(api=3, workers=3)
    (new,) = set(stack.containers("api")) - before
    wait_for(lambda: stack.health(new) == "healthy", timeout=90, interval=1, what="the third API healthy")
    ip = stack.ip(new)

    def sent_to_new() -> bool:
        for _ in range(6):
            assert httpx.get(f"{stack.url}/v1/models", timeout=10).status_code == 200
        return ip in stack.upstreams("/v1/models")

    # nginx re-resolves `api` every 10 s (valid=10s): no reload, no restart.
    wait_for(sent_to_new, timeout=60, interval=0.5, what=f"nginx sending to the new replica {ip}")


@dataclass(eq=False)
class Reader(threading.Thread):
    """Reads a stream through the proxy, resuming with Last-Event-ID whenever the connection breaks."""

    base: str
    sid: str
    events: list[SSE] = field(default_factory=list)
    breaks: int = 0
    error: BaseException | None = None

    def __post_init__(self) -> None:
        super().__init__(daemon=True, name=f"reader-{self.sid}")

    def run(self) -> None:
        deadline = time.monotonic() + 150
        try:
            while not (self.events and self.events[-1].event in ("done", "error")):
                assert time.monotonic() < deadline, f"stream {self.sid} never ended: {self.events[-3:]}"
                try:
                    self._read()
                except httpx.HTTPError:
                    time.sleep(0.2)  # the proxy's next try; the deadline bounds the loop
                if not (self.events and self.events[-1].event in ("done", "error")):
                    self.breaks += 1
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _read(self) -> None:
        headers = {"Last-Event-ID": self.events[-1].id} if self.events else {}
        with httpx.stream("GET", f"{self.base}/v1/streams/{self.sid}", headers=headers,
                          timeout=httpx.Timeout(60)) as resp:
            if resp.status_code != 200:
                resp.read()
                raise httpx.HTTPError(f"{resp.status_code}: {resp.text}")
            for ev in sse_events(resp):
                if ev.event not in ("queued", "reconnect"):  # outside the seq space
                    self.events.append(ev)
                if ev.event in ("done", "error"):
                    return

    def tokens(self) -> int:
        return sum(e.event == "token" for e in self.events)

    def finish(self) -> list[SSE]:
        self.join(170)
        assert not self.is_alive(), f"stream {self.sid} hangs"
        assert self.error is None, self.error
        assert_whole(self.events)
        return self.events


def long_stream(stack: Stack) -> Reader:
    sid = create_stream(stack.url, LONG_PROMPT, max_tokens=250, temperature=0)
    reader = Reader(stack.url, sid)
    reader.start()
    wait_for(lambda: reader.tokens() >= 8, timeout=90, what="the first tokens")
    return reader


def test_a_killed_worker_s_stream_continues_on_another(stack: Stack) -> None:
    reader = long_stream(stack)
    victim = wait_for(lambda: stack.serving_worker(reader.sid), timeout=10, what="the serving worker")
    stack.docker.run("kill", victim)
    evs = reader.finish()
    assert evs[-1].event == "done", evs[-1]
    assert stack.serving_worker(reader.sid) not in ("", victim), "another worker finished it"
    assert len(stack.containers("worker-cpu")) == 2


def test_a_killed_api_replica_s_client_resumes_on_another(stack: Stack) -> None:
    reader = long_stream(stack)

    def serving() -> str:
        metric = re.compile(r"^tokenfan_api_active_streams 1\.0$", re.M)
        probe = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8000/metrics').read().decode())"
        busy = [c for c in stack.containers("api") if metric.search(stack.exec(c, "python", "-c", probe))]
        return busy[0] if len(busy) == 1 else ""

    victim = wait_for(serving, timeout=20, what="the replica serving the stream")
    stack.docker.run("kill", victim)
    evs = reader.finish()
    assert evs[-1].event == "done", evs[-1]
    assert reader.breaks >= 1, "the client's connection broke and it resumed"


def test_redis_killed_and_restarted_hangs_no_stream(stack: Stack) -> None:
    readers = [long_stream(stack) for _ in range(2)]
    (redis,) = stack.containers("redis")
    stack.docker.run("kill", redis)
    stack.docker.run("start", redis)
    for reader in readers:
        evs = reader.finish()
        # Ended either way, never left open: done, or an error the client may retry.
        assert evs[-1].event == "done" or evs[-1].json().get("retryable") is not None, evs[-1]
    wait_for(lambda: stack.health(redis) == "healthy", timeout=60, interval=1, what="Redis healthy again")
    sid = create_stream(stack.url, PROMPT, max_tokens=8)
    _, evs = read_stream(stack.url, sid, timeout=120)
    assert evs and evs[-1].event == "done", evs[-1:]


def test_compose_down_leaves_nothing_the_test_made(stack: Stack) -> None:
    assert stack.leftovers(), "the stack's containers, network and volumes exist before"
    stack.save_logs(stack.project)
    stack.down()
    assert stack.leftovers() == []
