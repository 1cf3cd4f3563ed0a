"""The deploy files' own programs as test processes: Debian's nginx and Prometheus.

The shipped nginx config and Prometheus config are templates (`ops/nginx/nginx.conf.template`,
`ops/prometheus/prometheus.yml.template`); `render` does what the official nginx image's entrypoint
does with /etc/nginx/templates/*.template: `envsubst` with an explicit list of variables, so the
programs' own `$variables` stay untouched. A variable the template uses and the caller does not give
fails here, where the image would leave `${NAME}` in the file for nginx to choke on.

nginx and Prometheus come from Debian's packages (`scripts/test` installs them). A missing binary fails
the test with what to install; it never skips, since a skipped proxy test proves nothing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

import httpx
import pytest

from tests.ports import free_port
from tests.procs import LOG_DIR, wait_for
from tokenfan.ops.embedded import stop_process

ROOT = Path(__file__).resolve().parents[1]
NGINX_TEMPLATE = ROOT / "ops/nginx/nginx.conf.template"
PROMETHEUS_TEMPLATE = ROOT / "ops/prometheus/prometheus.yml.template"
PROMETHEUS_RULES = ROOT / "ops/prometheus/alerts.yml"
# The templates' own variables: nginx's start NGINX_, Prometheus's PROMETHEUS_ (the image's
# NGINX_ENVSUBST_FILTER in compose.yaml is the same prefix).
_VARIABLE = re.compile(r"\$\{((?:NGINX|PROMETHEUS)_[A-Z0-9_]+)\}")


def binary(name: str, package: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        pytest.fail(f"`{name}` is not installed: install Debian's `{package}` package "
                    "(scripts/test does, as root)", pytrace=False)
    return found


def variables(template: Path) -> set[str]:
    return set(_VARIABLE.findall(template.read_text()))


def render(template: Path, env: dict[str, str]) -> str:
    """The template with `env` substituted by envsubst, as the nginx image renders it."""
    missing = variables(template) - set(env)
    assert not missing, f"{template.name}: no value for {sorted(missing)}"
    shell_format = " ".join(f"${{{name}}}" for name in sorted(env))
    out = subprocess.run([binary("envsubst", "gettext-base"), shell_format], input=template.read_text(),
                         env=env, capture_output=True, text=True, timeout=10, check=True)
    return out.stdout


def nginx_env(api_ports: list[int], port: int) -> dict[str, str]:
    """Outside compose: listed servers, no resolver (Debian's nginx has no `server ... resolve`)."""
    return {
        "NGINX_PORT": f"127.0.0.1:{port}",
        "NGINX_API_SERVERS": " ".join(f"server 127.0.0.1:{p};" for p in api_ports),
        # Nobody listens there: /grafana/ answers 502, which no test here needs otherwise.
        "NGINX_GRAFANA_SERVERS": f"server 127.0.0.1:{free_port()};",
        "NGINX_RESOLVER": "",
    }


class Process:
    """A program started from a rendered config in a directory of its own, stopped on exit."""

    def __init__(self, name: str, test_name: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"tokenfan-{name}-"))
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{test_name}.{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _start(self, argv: list[str]) -> None:
        with self.log_path.open("wb") as fh:
            self.popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def __enter__(self) -> Process:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.popen is not None:
            stop_process(self.popen, 15)
        shutil.rmtree(self.dir, ignore_errors=True)


class Nginx(Process):
    """Debian's nginx, in the foreground, serving the rendered ops/nginx template."""

    def __init__(self, api_ports: list[int], test_name: str) -> None:
        super().__init__("nginx", test_name)
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(render(NGINX_TEMPLATE, nginx_env(api_ports, self.port)))

    def argv(self, *extra: str) -> list[str]:
        return [binary("nginx", "nginx"), "-p", str(self.dir), "-c", str(self.conf), "-e", "stderr",
                "-g", f"pid {self.dir / 'nginx.pid'};", *extra]

    def check(self) -> subprocess.CompletedProcess[str]:
        """`nginx -t` on the rendered file."""
        return subprocess.run(self.argv("-t"), capture_output=True, text=True, timeout=30)

    def __enter__(self) -> Nginx:
        checked = self.check()
        assert checked.returncode == 0, checked.stderr
        self._start(self.argv("-g", "daemon off;"))
        wait_for(self._ready, timeout=30, what=f"nginx on {self.port}\n{self.log()}")
        return self

    def _ready(self) -> bool:
        assert self.alive(), self.log()
        return httpx.get(f"{self.url}/nginx-health", timeout=1).status_code == 200


class Prometheus(Process):
    """Debian's Prometheus on the rendered ops/prometheus template and the shipped alert rules."""

    def __init__(self, env: dict[str, str], test_name: str) -> None:
        super().__init__("prometheus", test_name)
        self.conf = self.dir / "prometheus.yml"
        self.conf.write_text(render(PROMETHEUS_TEMPLATE, env))
        # The template names its rule files relative to itself, as compose mounts them.
        shutil.copy(PROMETHEUS_RULES, self.dir / PROMETHEUS_RULES.name)

    def __enter__(self) -> Prometheus:
        self._start([binary("prometheus", "prometheus"), f"--config.file={self.conf}",
                     f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                     "--log.level=warn"])
        wait_for(self._ready, timeout=60, what=f"Prometheus on {self.port}\n{self.log()}")
        return self

    def _ready(self) -> bool:
        assert self.alive(), self.log()
        return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
