"""Checks of the deploy files: compose, Dockerfiles, nginx, Prometheus, Grafana, Kubernetes.

Nothing here needs a Docker engine or a cluster: the files are parsed and
checked against each other and against the contracts in docs/protocol.md
(queue key layout) and docs/metrics.md (metric names). The metric names
are written out below on purpose instead of being imported from tokenfan:
the dashboard and the docs are a contract the code has to keep.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import NGINX_TEMPLATE, PROMETHEUS_RULES, PROMETHEUS_TEMPLATE, Nginx, binary, render, variables
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
OPS = ROOT / "ops"
K8S = OPS / "k8s"
DOCKER = OPS / "docker"

# name -> type; every metric tokenfan exports (docs/metrics.md has the table).
METRICS: dict[str, str] = {
    "tokenfan_api_requests_total": "counter",
    "tokenfan_api_active_streams": "gauge",
    "tokenfan_api_resumes_total": "counter",
    "tokenfan_api_disconnects_total": "counter",
    "tokenfan_api_first_token_seconds": "histogram",
    "tokenfan_api_relay_lag_seconds": "histogram",
    "tokenfan_api_events_relayed_total": "counter",
    "tokenfan_api_pubsub_reconnects_total": "counter",
    "tokenfan_queue_depth": "gauge",
    "tokenfan_workers_live": "gauge",
    "tokenfan_worker_queue_wait_seconds": "histogram",
    "tokenfan_worker_ttft_seconds": "histogram",
    "tokenfan_worker_tokens_generated_total": "counter",
    "tokenfan_worker_tokens_per_second": "histogram",
    "tokenfan_worker_jobs_total": "counter",
    "tokenfan_worker_model_load_seconds": "gauge",
    "tokenfan_worker_busy": "gauge",
    "tokenfan_worker_slots": "gauge",
    "tokenfan_worker_slots_busy": "gauge",
    "tokenfan_worker_batch_streams": "histogram",
    "tokenfan_worker_step_seconds": "histogram",
    "tokenfan_worker_prefill_tokens_total": "counter",
    "tokenfan_worker_decode_tokens_total": "counter",
    "tokenfan_worker_prompt_cache_tokens_total": "counter",
    "tokenfan_worker_failovers_total": "counter",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Every environment variable tokenfan reads (shared/settings.py);
# a misspelt one in a manifest would be silently ignored.
KNOWN_ENV = {
    "REDIS_URL",
    "TOKENFAN_REDIS_URL",
    "TOKENFAN_REDIS_CLUSTER",
    "TOKENFAN_MODEL",
    "TOKENFAN_MODEL_PATH",
    "TOKENFAN_MODELS",
    "TOKENFAN_ENGINE",
    "TOKENFAN_THREADS",
    "TOKENFAN_N_GPU_LAYERS",
    "TOKENFAN_N_CTX",
    "TOKENFAN_METRICS_PORT",
    "TOKENFAN_WORKER_NAME",
    "TOKENFAN_HOST",
    "TOKENFAN_PORT",
    "TOKENFAN_LOG_TTL_S",
    "TOKENFAN_LEASE_TTL_S",
    "TOKENFAN_FAILOVER",
    "TOKENFAN_SHUTDOWN_GRACE_S",
}

QUEUE_KEY = re.compile(r"^rq:queue:tf:q:([A-Za-z0-9_.-]+)$")
GRACE_MIN_S = 30


# --------------------------------------------------------------------------- helpers


def yaml_files() -> list[Path]:
    files = [ROOT / "compose.yaml", *OPS.rglob("*.yaml"), *OPS.rglob("*.yml")]
    return sorted(set(files))


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


_INTERP = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^${}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with no variable set: defaults, innermost first."""

    def one(m: re.Match[str]) -> str:
        op, arg = m.group(2), m.group(3) or ""
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            return "set"  # compose would stop and print `arg`; any value will do here
        return ""

    while True:
        new = _INTERP.sub(one, value)
        if new == value:
            return new.replace("$$", "$")
        value = new


def seconds(text: str) -> float:
    """A duration in nginx or compose syntax: 300, 300s, 1h, 1m30s, 500ms."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|)", text.strip())
    assert parts and "".join(n + u for n, u in parts) == text.strip(), f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def env_of(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def depends_on(service: dict[str, Any]) -> list[str]:
    deps = service.get("depends_on") or []
    return list(deps) if isinstance(deps, (list, dict)) else []


# --------------------------------------------------------------------------- YAML


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = load_all(path)
    assert docs, f"{path.name} holds no document"
    assert all(isinstance(d, dict) for d in docs), f"{path.name}: a document is not a mapping"


# --------------------------------------------------------------------------- compose


def test_compose_has_every_tier(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= {"redis", "api", "proxy", "worker", "worker-cpu", "prometheus", "grafana"}


def test_compose_references_only_what_it_defines(compose: dict[str, Any]) -> None:
    services = compose["services"]
    volumes = set(compose.get("volumes") or {})
    networks = set(compose.get("networks") or {}) | {"default"}
    for name, svc in services.items():
        for dep in depends_on(svc):
            assert dep in services, f"{name} depends on undefined service {dep}"
        for link in svc.get("links", []) + svc.get("volumes_from", []):
            assert link.split(":")[0] in services, f"{name} links undefined service {link}"
        mode = svc.get("network_mode", "")
        if mode.startswith("service:"):
            assert mode.split(":", 1)[1] in services
        for net in svc.get("networks") or []:
            assert net in networks, f"{name} joins undefined network {net}"
        for vol in svc.get("volumes") or []:
            source = interpolate(vol["source"]) if isinstance(vol, dict) else interpolate(vol).split(":")[0]
            if source.startswith((".", "/", "~")):
                assert source.startswith("./"), f"{name} mounts a host path outside the repo: {source}"
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in volumes, f"{name} uses undefined volume {source}"


def test_compose_profiles(services: dict[str, dict[str, Any]]) -> None:
    profiles = {name: set(svc.get("profiles") or []) for name, svc in services.items()}
    assert set().union(*profiles.values()) <= {"gpu", "cpu"}
    assert profiles["worker"] == {"gpu"}
    assert profiles["worker-cpu"] == {"cpu"}
    for core in ("redis", "api", "proxy", "prometheus", "grafana"):
        assert not profiles[core], f"{core} must run whatever profile is chosen"
    for name, svc in services.items():
        for dep in depends_on(svc):
            assert profiles[dep] <= profiles[name], (
                f"{name} depends on {dep}, which its profile may not start"
            )


def test_compose_dockerfiles_exist(services: dict[str, dict[str, Any]]) -> None:
    built = {name: svc["build"] for name, svc in services.items() if "build" in svc}
    assert set(built) >= {"api", "worker", "worker-cpu"}
    for name, build in built.items():
        context = ROOT / build.get("context", ".")
        assert context.resolve() == ROOT, f"{name}: the build context must be the repo root"
        assert (context / build["dockerfile"]).is_file(), f"{name}: missing {build['dockerfile']}"
    assert built["worker"]["dockerfile"].endswith("Dockerfile.worker-cuda")
    assert built["worker-cpu"]["dockerfile"].endswith("Dockerfile.worker")
    assert built["api"]["dockerfile"].endswith("Dockerfile.api")


def test_only_the_proxy_publishes_a_port(services: dict[str, dict[str, Any]]) -> None:
    published = {name for name, svc in services.items() if svc.get("ports")}
    assert published == {"proxy"}
    assert interpolate(services["proxy"]["image"]).startswith("nginx:1.27")
    assert [interpolate(str(p)) for p in services["proxy"]["ports"]] == ["8000:80"]
    assert "HTTP_PORT" in str(services["proxy"]["ports"][0])


def test_compose_redis(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert redis["image"] == "${REDIS_IMAGE:-redis:7-alpine}"
    cmd = redis["command"] if isinstance(redis["command"], list) else shlex.split(redis["command"])
    assert cmd[0] == "redis-server"
    pairs = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert pairs["--requirepass"].startswith("${REDIS_PASSWORD:?"), "the password must be required"
    assert pairs["--appendonly"] == "yes"
    assert pairs["--appendfsync"] == "everysec"
    assert "test" in redis["healthcheck"]


def test_compose_tokenfan_env(services: dict[str, dict[str, Any]]) -> None:
    for name in ("api", "worker", "worker-cpu"):
        env = env_of(services[name])
        url = interpolate(env["REDIS_URL"] or "")
        assert re.fullmatch(r"rediss?://:[^@]+@redis:6379/\d+", url), f"{name}: REDIS_URL {url}"
        assert "${REDIS_PASSWORD" in (env["REDIS_URL"] or "")
        unknown = {k for k in env if k.startswith("TOKENFAN_")} - KNOWN_ENV
        assert not unknown, f"{name} sets variables tokenfan does not read: {unknown}"
    api = env_of(services["api"])
    assert api["TOKENFAN_HOST"] == "0.0.0.0"
    assert interpolate(api["TOKENFAN_MODEL"] or "") == "smollm2"
    assert interpolate(api["TOKENFAN_MODELS"] or "") == "", "empty: the API serves TOKENFAN_MODEL"


def test_compose_api_replicas(services: dict[str, dict[str, Any]]) -> None:
    api = services["api"]
    assert "${API_REPLICAS:-2}" in str(api["deploy"]["replicas"])
    assert int(interpolate(str(api["deploy"]["replicas"]))) == 2
    assert "ports" not in api
    assert seconds(api["stop_grace_period"]) >= GRACE_MIN_S


def test_compose_gpu_worker(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert "${WORKER_REPLICAS:-1}" in str(worker["deploy"]["replicas"])
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert interpolate(env_of(worker)["TOKENFAN_N_GPU_LAYERS"] or "") == "-1"
    assert "devices" not in str(services["worker-cpu"].get("deploy", {}))
    for name in ("worker", "worker-cpu"):
        assert seconds(services[name]["stop_grace_period"]) >= GRACE_MIN_S, f"{name}: SIGTERM grace"
        env = env_of(services[name])
        assert "TOKENFAN_MODEL" in env and "TOKENFAN_MODEL_PATH" in env
        assert any(interpolate(v).endswith(":/models:ro") for v in services[name]["volumes"])


def test_compose_grafana_mounts_provisioning(services: dict[str, dict[str, Any]]) -> None:
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./ops/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((OPS / "grafana/provisioning/dashboards/tokenfan.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert mounts["./ops/grafana/dashboards"] == path, (
        "the provider must read where compose mounts the dashboards"
    )


# --------------------------------------------------------------------------- Dockerfiles


@dataclass
class Dockerfile:
    path: Path
    instructions: list[tuple[str, str]]
    global_args: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        instructions: list[tuple[str, str]] = []
        buf = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if line.startswith("#") or (not buf and not line):
                continue
            if line.endswith("\\"):
                buf += line[:-1] + " "
                continue
            buf += line
            word, _, rest = buf.partition(" ")
            instructions.append((word.upper(), rest.strip()))
            buf = ""
        args: dict[str, str] = {}
        for word, rest in instructions:
            if word == "FROM":
                break
            if word == "ARG" and "=" in rest:
                key, _, value = rest.partition("=")
                args[key] = value.strip('"')
        return cls(path, instructions, args)

    def all(self, word: str) -> list[str]:
        return [rest for w, rest in self.instructions if w == word]

    def images(self) -> list[tuple[str, str | None]]:
        """(image, stage name) of every FROM, with global ARG defaults substituted."""
        out = []
        for rest in self.all("FROM"):
            parts = [p for p in rest.split() if not p.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: self.global_args.get(m.group(1), m.group(0)), parts[0])
            out.append((image, parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None))
        return out

    def copies(self) -> list[tuple[list[str], list[str]]]:
        """(flags, sources) of every COPY/ADD."""
        out = []
        for word, rest in self.instructions:
            if word not in ("COPY", "ADD"):
                continue
            args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
            flags = [a for a in args if a.startswith("--")]
            paths = [a for a in args if not a.startswith("--")]
            assert len(paths) >= 2, f"{self.path.name}: {word} {rest}"
            out.append((flags, paths[:-1]))
        return out


DOCKERFILES = {
    "api": DOCKER / "Dockerfile.api",
    "worker": DOCKER / "Dockerfile.worker",
    "worker-cuda": DOCKER / "Dockerfile.worker-cuda",
}


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(rel: str) -> bool:
    """Whether .dockerignore keeps `rel` (or a folder holding it) out of the build context."""
    parents = [rel] + ["/".join(rel.split("/")[:n]) for n in range(1, rel.count("/") + 1)]
    ignored = False
    for pat in dockerignore_patterns():
        negate = pat.startswith("!")
        rx = _glob_regex(pat.lstrip("!").strip("/"))
        if any(rx.fullmatch(p) for p in parents):
            ignored = not negate
    return ignored


def test_dockerignore_matcher() -> None:
    # The matcher the next test relies on, checked on this repo's own patterns.
    assert dockerignored(".git/config")
    assert dockerignored("api/__pycache__/app.cpython-311.pyc")
    assert dockerignored("bench/main.py")
    assert not dockerignored("pyproject.toml")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_copies_exist_in_the_context(name: str) -> None:
    df = Dockerfile.read(DOCKERFILES[name])
    stages = {stage for _, stage in df.images() if stage}
    sources: list[str] = []
    for flags, srcs in df.copies():
        stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
        if stage is not None:
            assert stage in stages, f"{name}: COPY --from={stage} names no stage"
            continue
        for src in srcs:
            sources.append(src)
            if any(c in src for c in "*?["):
                continue  # BuildKit allows a wildcard to match nothing (README.md*)
            assert (ROOT / src).exists(), f"{name}: COPY source {src} is not in the repo"
            assert not dockerignored(src.strip("./") or "."), f"{name}: .dockerignore drops {src}"
    folders = {s.rstrip("/") for s in sources}
    # Every package setuptools maps must be in the context, the benchmark never.
    assert {"pyproject.toml", "shared", "api", "worker", "ops/*.py"} <= folders
    assert not folders & {"bench", "tests", "docs", "."}
    # pyproject.toml names a readme; setuptools reads it when it is there.
    assert any(re.fullmatch(_glob_regex(s).pattern, "README.md") for s in sources)


def test_dockerignore_keeps_the_package() -> None:
    product = [ROOT / d for d in ("shared", "api", "worker")]
    files = [p for d in product for p in d.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    files += [*(ROOT / "ops").glob("*.py"), ROOT / "ops/docker/requirements.py"]
    assert files
    dropped = [str(p.relative_to(ROOT)) for p in files if dockerignored(str(p.relative_to(ROOT)))]
    assert not dropped, f".dockerignore drops package files: {dropped[:5]}"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_installs_and_runs_tokenfan(name: str) -> None:
    df = Dockerfile.read(DOCKERFILES[name])
    runs = " ".join(df.all("RUN"))
    assert re.search(r"pip install\b[^&;|]*\s\.(\s|$)", runs), f"{name}: no `pip install .`"
    images = df.images()
    assert len(images) >= 2, f"{name}: build and runtime stages expected"
    stages = {stage for _, stage in images if stage}
    for image, _ in images:
        if image in stages:
            continue  # a stage built on an earlier one (FROM build AS product)
        assert "$" not in image, f"{name}: unresolved {image}"
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"
        m = re.fullmatch(r"python:(\d+)\.(\d+).*", image)
        if m:
            assert (int(m[1]), int(m[2])) >= (3, 11), f"{name}: tokenfan needs Python 3.11+"
    assert json.loads(df.all("ENTRYPOINT")[-1]) == ["tokenfan"]
    role = "api" if name == "api" else "worker"
    assert json.loads(df.all("CMD")[-1]) == [role]
    assert df.all("EXPOSE")[-1].split() == (["8000"] if role == "api" else ["9400"])
    users = df.all("USER")
    assert users and users[-1] not in ("root", "0"), f"{name}: runs as root"


def test_the_cpu_worker_image_compiles_llama_cpp_unless_told_otherwise() -> None:
    # A user's build compiles llama.cpp for any AVX2 host; only a build argument lets a wheel stand in
    # (the test suite's images take the one pip built here: tests/docker.py).
    df = Dockerfile.read(DOCKERFILES["worker"])
    assert "PIP_NO_BINARY=llama-cpp-python" in df.all("ARG")
    assert any("-DGGML_NATIVE=OFF" in arg for arg in df.all("ARG"))
    assert not any("--no-binary" in run or "PIP_NO_BINARY" in run for run in df.all("RUN"))


def test_api_image_listens_on_all_interfaces() -> None:
    env = " ".join(Dockerfile.read(DOCKERFILES["api"]).all("ENV"))
    assert "TOKENFAN_HOST=0.0.0.0" in env


def test_cuda_worker_image() -> None:
    df = Dockerfile.read(DOCKERFILES["worker-cuda"])
    images = [image for image, _ in df.images()]
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-devel-ubuntu[\d.]+", images[0])
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+", images[-1])
    assert images[0].split(":")[1].split("-")[0] == images[-1].split(":")[1].split("-")[0], (
        "same CUDA version"
    )
    assert images[0].rsplit("-", 1)[1] == images[-1].rsplit("-", 1)[1], (
        "same Ubuntu: the venv moves between them"
    )
    env = " ".join(df.all("ENV") + df.all("RUN"))
    assert re.search(r'CMAKE_ARGS="[^"]*-DGGML_CUDA=on', env)
    assert "TOKENFAN_N_GPU_LAYERS=-1" in env


# --------------------------------------------------------------------------- nginx
# The template is checked by nginx itself (`nginx -t` on the rendered file) and run for real in
# tests/e2e/test_proxy.py; here, compose's values are checked against the services they name.


def test_nginx_template_passes_nginx_t() -> None:
    """Rendered as outside compose (listed servers, no resolver), Debian's nginx accepts it."""
    nginx = Nginx([free_port(), free_port()], "test_deploy_files")
    try:
        checked = nginx.check()
    finally:
        shutil.rmtree(nginx.dir, ignore_errors=True)
    assert checked.returncode == 0, checked.stderr


def test_compose_renders_the_nginx_template(services: dict[str, dict[str, Any]]) -> None:
    proxy = services["proxy"]
    env = {k: v or "" for k, v in env_of(proxy).items()}
    mounts = [interpolate(v) for v in proxy["volumes"]]
    assert "./ops/nginx/nginx.conf.template:/etc/nginx/templates/nginx.conf.template:ro" in mounts
    # The image renders templates/X.template to $NGINX_ENVSUBST_OUTPUT_DIR/X: the whole nginx.conf.
    assert env["NGINX_ENVSUBST_OUTPUT_DIR"] == "/etc/nginx"
    assert re.match(env["NGINX_ENVSUBST_FILTER"], "NGINX_PORT")
    # The image leaves a variable it has no value for as ${NAME}: compose must give every one.
    wanted = variables(NGINX_TEMPLATE)
    assert wanted <= set(env), f"compose gives no {wanted - set(env)}"
    rendered = render(NGINX_TEMPLATE, {k: env[k] for k in wanted})
    assert "${NGINX_" not in rendered
    assert [p.rsplit(":", 1)[1] for p in proxy["ports"]] == [env["NGINX_PORT"]]
    ports = {"api": env_of(services["api"])["TOKENFAN_PORT"], "grafana": "3000"}
    for var, service in (("NGINX_API_SERVERS", "api"), ("NGINX_GRAFANA_SERVERS", "grafana")):
        servers = re.findall(r"server\s+([\w.-]+):(\d+)([^;]*);", env[var])
        assert servers, f"{var}: no server"
        for host, port, flags in servers:
            assert (host, port) == (service, ports[service]), f"{var}: {host}:{port}"
            if "resolve" in flags.split():
                # `server ... resolve` needs a resolver, and open-source nginx 1.27.3 or newer.
                assert env["NGINX_RESOLVER"].startswith("resolver "), "resolve with no resolver"
                tag = re.fullmatch(r"nginx:(\d+)\.(\d+)(?:\.(\d+))?-alpine", interpolate(proxy["image"]))
                assert tag and tuple(int(x or 99) for x in tag.groups()) >= (1, 27, 3), proxy["image"]


# --------------------------------------------------------------------------- Prometheus


def prometheus_env() -> dict[str, str]:
    """Outside compose: one API replica's discovery endpoint."""
    return {"PROMETHEUS_SD_URL": "http://127.0.0.1:8000/metrics/targets"}


def test_promtool_checks_the_rendered_config_and_the_rules(tmp_path: Path) -> None:
    promtool = binary("promtool", "prometheus")
    conf = tmp_path / "prometheus.yml"
    conf.write_text(render(PROMETHEUS_TEMPLATE, prometheus_env()))
    shutil.copy(PROMETHEUS_RULES, tmp_path / PROMETHEUS_RULES.name)
    for argv in (["check", "config", str(conf)], ["check", "rules", str(PROMETHEUS_RULES)]):
        out = subprocess.run([promtool, *argv], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
    config = yaml.safe_load(conf.read_text())
    assert config["rule_files"] == [PROMETHEUS_RULES.name]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"tokenfan-api", "tokenfan-worker"}
    for name, job in jobs.items():
        (sd,) = job["http_sd_configs"]
        assert sd["url"].endswith(f"/metrics/targets?role={name.removeprefix('tokenfan-')}")


def test_compose_renders_the_prometheus_template(services: dict[str, dict[str, Any]]) -> None:
    prom = services["prometheus"]
    env = {k: v or "" for k, v in env_of(prom).items()}
    assert variables(PROMETHEUS_TEMPLATE) <= set(env), "compose leaves a template variable unset"
    script = interpolate(prom["command"][0])
    sed = re.match(r'sed "[^"]*"', script)
    assert sed, script
    # The container's render step, run here on the template: the same file envsubst makes.
    out = subprocess.run(["sh", "-c", sed[0]], input=PROMETHEUS_TEMPLATE.read_text(), env=env,
                         capture_output=True, text=True, timeout=10, check=True)
    assert out.stdout == render(PROMETHEUS_TEMPLATE, env)
    url = re.fullmatch(r"http://([\w-]+):(\d+)/metrics/targets", env["PROMETHEUS_SD_URL"])
    assert url and url[1] in services and url[2] == env_of(services["api"])["TOKENFAN_PORT"]
    mounts = dict(v.split(":")[:2] for v in prom["volumes"] if v.startswith("./"))
    config = re.search(r"--config.file=(\S+)", script)
    assert config and mounts["./ops/prometheus/alerts.yml"] == str(Path(config[1]).parent / PROMETHEUS_RULES.name)
    assert f"> {config[1]}" in script
    assert mounts["./ops/prometheus/prometheus.yml.template"] in script


def test_grafana_datasource_points_at_prometheus(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load((OPS / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    (ds,) = config["datasources"]
    host = re.fullmatch(r"http://([\w-]+):9090", ds["url"])
    assert ds["type"] == "prometheus" and host and host[1] in services


# --------------------------------------------------------------------------- Grafana dashboard


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((OPS / "grafana/dashboards/tokenfan.json").read_text())
    return data


def all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(all_panels(p.get("panels", [])))
    return out


def exprs_of(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in all_panels(dashboard["panels"]) for t in p.get("targets", []) if "expr" in t]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        exprs.append(query["query"] if isinstance(query, dict) else str(query or ""))
    return exprs


def metric_names(expr: str) -> set[str]:
    names = set()
    for token in re.findall(r"tokenfan_[a-z_]+", expr):
        for suffix in HISTOGRAM_SUFFIXES:
            if token.endswith(suffix) and token[: -len(suffix)] in METRICS:
                token = token[: -len(suffix)]
        names.add(token)
    return names


def test_dashboard_uses_only_known_metrics(dashboard: dict[str, Any]) -> None:
    used = set().union(*(metric_names(e) for e in exprs_of(dashboard)))
    assert used <= set(METRICS), f"unknown metrics: {used - set(METRICS)}"
    assert used == set(METRICS), f"metrics with no panel: {set(METRICS) - used}"


def test_dashboard_queries_are_well_formed(dashboard: dict[str, Any]) -> None:
    for expr in exprs_of(dashboard):
        for name in re.findall(r"tokenfan_[a-z_]+", expr):
            base = name.removesuffix("_bucket")
            if METRICS.get(base) == "histogram":
                assert name.endswith("_bucket") and "histogram_quantile(" in expr and "le" in expr, expr
            if METRICS.get(name) == "counter":
                assert re.search(rf"(rate|increase)\(\s*{name}\b", expr), f"counter not in rate(): {expr}"
            if name in ("tokenfan_queue_depth", "tokenfan_workers_live"):
                # Every API replica reports the same Redis-wide value.
                assert not expr.lstrip().startswith("sum"), f"sum double-counts replicas: {expr}"
        assert "histogram_quantile" not in expr or "_bucket" in expr, expr


def test_dashboard_has_the_required_panels(dashboard: dict[str, Any]) -> None:
    exprs = exprs_of(dashboard)

    def quantiles(metric: str) -> set[str]:
        return {m for e in exprs for m in re.findall(rf"histogram_quantile\(([\d.]+),.*{metric}_bucket", e)}

    assert {"0.5", "0.95", "0.99"} <= quantiles("tokenfan_api_first_token_seconds")
    assert {"0.5", "0.99"} <= quantiles("tokenfan_api_relay_lag_seconds")
    assert "0.95" in quantiles("tokenfan_worker_queue_wait_seconds")
    assert any('outcome="error"' in e for e in exprs)
    assert any('status=~"5.."' in e for e in exprs)
    assert any('outcome="handed_over"' in e for e in exprs)
    assert any(e.startswith("avg") and "tokenfan_worker_busy" in e for e in exprs)


def test_dashboard_layout_and_datasource(dashboard: dict[str, Any]) -> None:
    config = yaml.safe_load((OPS / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    uid = config["datasources"][0]["uid"]
    panels = all_panels(dashboard["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: dict[tuple[int, int], int] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['id']} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = p["id"]
        if p["type"] == "row":
            continue
        assert p.get("targets"), f"panel {p['title']} has no query"
        for ref in [p.get("datasource"), *(t.get("datasource") for t in p["targets"])]:
            assert ref == {"type": "prometheus", "uid": uid}, f"panel {p['title']}: datasource {ref}"


# --------------------------------------------------------------------------- docs


def test_metrics_doc_lists_exactly_the_metrics() -> None:
    rows = re.findall(
        r"^\|\s*`(tokenfan_[a-z_]+)`\s*\|\s*(\w+)\s*\|", (ROOT / "docs/metrics.md").read_text(), re.M
    )
    documented = dict(rows)
    assert len(rows) == len(documented), "a metric is listed twice"
    assert documented == METRICS


def test_protocol_names_the_queue_layout() -> None:
    assert "`rq:queue:tf:q:{model}`" in (ROOT / "docs/protocol.md").read_text()


def test_no_machine_paths_in_deploy_files() -> None:
    ours = [
        ROOT / "compose.yaml",
        ROOT / ".dockerignore",
        ROOT / "docs/deploy.md",
        ROOT / "docs/metrics.md",
        *(p for p in OPS.rglob("*") if p.is_file()),
    ]
    for path in ours:
        text = path.read_text()
        assert "/work/" not in text and "/tmp/bash_jobs" not in text, f"{path.name} names a path of a machine"
        assert not re.search(r"https?://[\w.-]*(cdn|unpkg|jsdelivr)", text), f"{path.name} links a CDN"


# --------------------------------------------------------------------------- Kubernetes


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in k8s_files():
        for doc in load_all(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} defined twice"
            objects[key] = doc
    return objects


@pytest.mark.parametrize("path", k8s_files(), ids=lambda p: p.name)
def test_k8s_objects_are_complete(path: Path) -> None:
    for doc in load_all(path):
        assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: apiVersion/kind"
        assert doc.get("metadata", {}).get("name"), f"{path.name}: metadata.name"
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "tokenfan", f"{path.name}: namespace"


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization" and kust["namespace"] == "tokenfan"
    resources = kust["resources"]
    assert all((K8S / r).is_file() for r in resources)
    assert set(resources) == {p.name for p in k8s_files()} - {"secret.example.yaml"}
    images = {i["name"] for i in kust.get("images", [])}
    deployments = [p for p in k8s_files() if "deployment" in p.name]
    for path in deployments:
        for doc in load_all(path):
            for c in doc["spec"]["template"]["spec"]["containers"]:
                assert c["image"].split(":")[0] in images, f"{c['image']} not set by kustomize images"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(out.stdout) if d]
    assert kinds.count("Deployment") == 2 and "ScaledObject" in kinds


def pod_spec(k8s: dict[tuple[str, str], dict[str, Any]], name: str) -> dict[str, Any]:
    spec: dict[str, Any] = k8s[("Deployment", name)]["spec"]["template"]["spec"]
    return spec


def container_env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_k8s_env_and_refs(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    config = k8s[("ConfigMap", "tokenfan-config")]["data"]
    assert set(config) <= KNOWN_ENV, f"unknown settings: {set(config) - KNOWN_ENV}"
    for name in ("tokenfan-api", "tokenfan-worker"):
        spec = pod_spec(k8s, name)
        assert spec.get("enableServiceLinks") is False, "service links inject TOKENFAN_* variables"
        assert spec["terminationGracePeriodSeconds"] >= GRACE_MIN_S
        for c in spec["containers"]:
            assert set(container_env(c)) <= KNOWN_ENV
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    assert ("ConfigMap", src["configMapRef"]["name"]) in k8s
                if "secretRef" in src:
                    assert src["secretRef"]["name"] == secret["metadata"]["name"]
    assert "REDIS_URL" in secret["stringData"]


def test_k8s_api(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    deploy = k8s[("Deployment", "tokenfan-api")]
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["port"] in (*ports, *ports.values())
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = k8s[("Service", "tokenfan-api")]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert all(p["targetPort"] in (*ports, *ports.values()) for p in svc["spec"]["ports"])
    hpa = k8s[("HorizontalPodAutoscaler", "tokenfan-api")]
    assert (hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"]) == (
        "Deployment",
        "tokenfan-api",
    )
    assert any(m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"] if m["type"] == "Resource")
    assert c["resources"]["requests"]["cpu"], "an HPA on CPU needs a CPU request"


def test_k8s_worker_gets_a_gpu(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    (c,) = pod_spec(k8s, "tokenfan-worker")["containers"]
    assert str(c["resources"]["requests"]["nvidia.com/gpu"]) == "1"
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert container_env(c)["TOKENFAN_N_GPU_LAYERS"] == "-1"
    config = k8s[("ConfigMap", "tokenfan-config")]["data"]
    assert [p["containerPort"] for p in c["ports"]] == [int(config["TOKENFAN_METRICS_PORT"])]


def test_keda_scales_workers_on_the_rq_queue(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    so = k8s[("ScaledObject", "tokenfan-worker")]
    assert so["apiVersion"].startswith("keda.sh/")
    assert ("Deployment", so["spec"]["scaleTargetRef"]["name"]) in k8s
    assert so["spec"]["minReplicaCount"] >= 1, "scale to zero deadlocks on /readyz (see the file's comment)"
    assert any("zero" in key or "zero" in str(v) for key, v in so["metadata"].get("annotations", {}).items())
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "redis"
    meta = trigger["metadata"]
    model = QUEUE_KEY.fullmatch(meta["listName"])
    assert model, f"listName {meta['listName']} is not rq:queue:tf:q:<model>"
    config = k8s[("ConfigMap", "tokenfan-config")]["data"]
    assert model[1] == config["TOKENFAN_MODEL"]
    assert model[1] in config["TOKENFAN_MODELS"].split(",")
    assert int(meta["listLength"]) > 0
    assert meta.get("address") or meta.get("addressFromEnv") or meta.get("host")
    auth_name = trigger.get("authenticationRef", {}).get("name")
    if auth_name is None:
        assert meta.get("passwordFromEnv"), "Redis needs a password"
        return
    auth = k8s[("TriggerAuthentication", auth_name)]
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert refs["password"]["name"] == secret["metadata"]["name"]
    assert refs["password"]["key"] in secret["stringData"]


def test_every_known_variable_is_read_by_the_production_settings() -> None:
    """The list above is the deploy files' contract; the settings must keep reading each name in it
    (a renamed variable would leave a manifest setting something nobody reads)."""
    from tokenfan.ops.flags import Group
    from tokenfan.shared.settings import ApiSettings, WorkerSettings

    read = {env for cls in (ApiSettings, WorkerSettings) for f in cls.model_fields for env in Group(cls).envs(f)}
    assert KNOWN_ENV <= read, f"no setting reads {KNOWN_ENV - read}"
    assert not {v for v in KNOWN_ENV if v.startswith("TOKENFAN_FAKE_")}, "the fake engine is no production setting"


def test_k8s_monitoring_finds_the_pods(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    """The optional Prometheus Operator path: a PodMonitor per tier on its named port, the shipped rules."""
    docs = {(d["kind"], d["metadata"]["name"]): d for d in load_all(K8S / "monitoring/podmonitors.yaml")}
    kust = yaml.safe_load((K8S / "monitoring/kustomization.yaml").read_text())
    assert kust["resources"] == ["podmonitors.yaml"]
    for tier in ("api", "worker"):
        monitor = docs[("PodMonitor", f"tokenfan-{tier}")]["spec"]
        template = k8s[("Deployment", f"tokenfan-{tier}")]["spec"]["template"]
        assert monitor["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c["ports"]}
        (endpoint,) = monitor["podMetricsEndpoints"]
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
        # Clusters without the operator: the annotations name the same port.
        assert template["metadata"]["annotations"]["prometheus.io/port"] == str(ports[endpoint["port"]])
    rule = docs[("PrometheusRule", "tokenfan")]["spec"]
    assert rule == yaml.safe_load(PROMETHEUS_RULES.read_text()), "ops/prometheus/alerts.yml and the rule differ"
