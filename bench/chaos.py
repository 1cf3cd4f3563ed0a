"""`tokenfan bench chaos`: a soak under faults, counting what clients lose.

For `--duration` seconds, `--streams` clients each run stream after stream
(fake engine, deterministic text) over 2 API processes and 3 workers, while
a driver, seeded (`--seed`), injects one fault at a time at random
intervals: a worker SIGKILLed or SIGTERMed, an API process SIGKILLed or
SIGTERMed, Redis SIGKILLed and started again from its append-only file
(`--faults` picks the kinds). Every process that went down is started
again after a random pause (a replacement worker has a new name, as a new
pod would; an API process comes back on its port; Redis on its port with
its files, down for up to 10 s).

Each client resumes as `EventSource` does: when its connection ends without
a terminal event (a killed API, a `reconnect` event, an API's own retryable
`error` that is no event of the stream's) it waits the last `retry:` a
server gave (else a second) and reconnects with `Last-Event-ID` to either API,
chosen at random; a 5xx or 429 answer is retried the same way (an app
would), any other status ends the stream as failed.

What is counted, per stream: completed (`done`), ended with a retryable
`error` of the stream's own, failed (any other end), hung (no new event for
`--hang-after` seconds: the watchdog gives up on it; must be 0), and the
tokens lost or doubled against the fake engine's exact text (a client that
appends every token event it gets, duplicates included; must be 0). Per
kind of fault, the time to recover: from the fault to the moment every
stream that had started and not ended made progress again (its next event
or its end), the slowest of them.

Deliberate departures from the obvious: faults never overlap (the next one
is drawn after the last process is back), so each one's recovery is its
own; the kinds come in rounds (each once per round, in a seeded random
order), so a short soak meets all of them; the clients run in the bench process (on one asyncio loop), since
here the figures are counts, not latencies.
"""

from __future__ import annotations

import asyncio
import difflib
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import redis
from httpx_sse import EventSource, ServerSentEvent

from tokenfan.bench.procs import BenchError, Child, Stack, child_env, progress, wait_http, wait_until
from tokenfan.bench.stats import summary
from tokenfan.ops.embedded import find_redis_server, free_port, stop_process
from tokenfan.shared import keys
from tokenfan.worker.engines import fake_tokens

FAULTS = ("worker-kill", "worker-term", "api-kill", "api-term", "redis-restart")
MODEL = "smollm2"
# The recorded run's size: the issue's.
DURATION_S = 600.0
STREAMS = 50
APIS = 2
WORKERS = 3
# Tokens per second per stream, and answer lengths: streams of one to six seconds, so every fault
# catches many of them mid-stream and each client runs a few hundred in ten minutes.
RATE = 20.0
TOKENS = (20, 120)
# Seconds between one fault's process being back and the next fault; how long a process stays down.
GAP_S = (5.0, 15.0)
DOWN_S = (0.5, 3.0)
# The Redis outage: up to 10 s.
REDIS_DOWN_S = (1.0, 10.0)
# compose.yaml's lease; the keeper renews it every second (the default).
LEASE_TTL_S = 5.0
# A SIGTERMed worker hands back what it has not finished by then: long enough that short streams
# finish, short enough that long ones are handed back.
WORKER_GRACE_S = 3.0
API_GRACE_S = 5.0
# No new event for this long and the stream is hung. What a stream may legitimately wait: Redis down
# (10 s), then its lease lapsing (5 s) and a takeover; a viewer's resume after a fault of its own.
HANG_AFTER_S = 45.0
# EventSource's wait before it reconnects when the server gave no `retry:` (browsers use about 3 s).
RETRY_S = 1.0
# A stream that cannot even be created for this long is given up (counted, not hung: it never started).
CREATE_GIVE_UP_S = 60.0
# Statuses an app retries (Redis or a worker away, an API starting or stopping, a busy queue).
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
STOP_WAIT_S = 60.0
# Streams that did not complete, named in the result (to look up in the processes' logs).
UNFINISHED_SHOWN = 20


@dataclass(frozen=True)
class Plan:
    duration_s: float = DURATION_S
    streams: int = STREAMS
    seed: int = 1
    faults: tuple[str, ...] = FAULTS
    apis: int = APIS
    workers: int = WORKERS
    rate: float = RATE
    tokens: tuple[int, int] = TOKENS
    gap_s: tuple[float, float] = GAP_S
    down_s: tuple[float, float] = DOWN_S
    redis_down_s: tuple[float, float] = REDIS_DOWN_S
    lease_ttl_s: float = LEASE_TTL_S
    keeper_interval_s: float = 1.0
    hang_after_s: float = HANG_AFTER_S

    def slots(self) -> int:
        """Per worker: enough that the workers left after one is lost hold every stream."""
        return -(-self.streams // max(self.workers - 1, 1))


# --- the processes ------------------------------------------------------------

class AofRedis:
    """redis-server with its append-only file on (as compose.yaml runs it), restartable on its port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="tokenfan-chaos-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + STOP_WAIT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"redis-server exited with {self.proc.returncode}")
            try:
                with redis.Redis.from_url(self.url, socket_timeout=1) as r:
                    if r.ping():
                        return
            except redis.RedisError:  # loading its AOF, or not listening yet
                pass
            time.sleep(0.05)
        raise BenchError("redis-server did not come back in time")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_WAIT_S)

    def close(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Rig:
    """Redis, the API processes and the workers of the soak, and how to take each down and up."""

    stack: Stack
    plan: Plan
    redis_server: AofRedis = field(default_factory=AofRedis)
    ports: list[int] = field(default_factory=list)
    apis: list[Child] = field(default_factory=list)
    workers: list[Child] = field(default_factory=list)
    started: int = 0

    def env(self, extra: dict[str, str]) -> dict[str, str]:
        return child_env(self.redis_server.url, {
            "TOKENFAN_ENGINE": "fake", "TOKENFAN_FAKE_RATE": str(self.plan.rate),
            "TOKENFAN_FAKE_TOKENS": str(self.plan.tokens[1]), "TOKENFAN_SLOTS": str(self.plan.slots()),
            "TOKENFAN_LEASE_TTL_S": str(self.plan.lease_ttl_s),
            "TOKENFAN_KEEPER_INTERVAL_S": str(self.plan.keeper_interval_s),
            "TOKENFAN_MAX_QUEUE": str(self.plan.streams * 4), **extra})

    def start(self) -> None:
        self.redis_server.start()
        self.ports = [free_port() for _ in range(self.plan.apis)]
        self.apis = [self.api(i) for i in range(self.plan.apis)]
        self.workers = [self.worker() for _ in range(self.plan.workers)]

    def close(self) -> None:
        for c in [*self.workers, *self.apis]:
            self.stack.stop(c)
        self.redis_server.close()

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def api(self, i: int) -> Child:
        argv = ["-m", "tokenfan.ops", "api", "--port", str(self.ports[i]), "--log-level", "WARNING"]
        child = self.stack.spawn(f"api{i}", argv, self.env({"TOKENFAN_SHUTDOWN_GRACE_S": str(API_GRACE_S)}))
        child.port = self.ports[i]
        wait_http(child, "/healthz")
        return child

    def worker(self) -> Child:
        self.started += 1
        name = f"chaos-w{self.started}"
        argv = ["-m", "tokenfan.ops", "worker", "--worker-name", name, "--log-level", "INFO"]
        child = self.stack.spawn(name, argv, self.env({"TOKENFAN_SHUTDOWN_GRACE_S": str(WORKER_GRACE_S)}))
        child.name = name
        with redis.Redis.from_url(self.redis_server.url) as r:
            wait_until(lambda: r.zscore(keys.workers(MODEL), name) is not None, child, f"worker {name}")
        return child


def _signal(child: Child, sig: signal.Signals, wait_s: float) -> None:
    """Send `sig` and wait for the process to exit (SIGKILL after `wait_s`: a stuck shutdown is a finding
    of its own, in the process's log, but must not stop the soak)."""
    if child.alive():
        child.popen.send_signal(sig)
    try:
        child.popen.wait(wait_s)
    except subprocess.TimeoutExpired:
        progress(f"{child.name} did not exit within {wait_s:g}s of {sig.name}; killing it")
        child.popen.kill()
        child.popen.wait(STOP_WAIT_S)


@dataclass
class Fault:
    kind: str
    target: str
    at: float  # monotonic, when injected
    back: float = 0.0  # when the process was up again


class Driver(threading.Thread):
    """One fault at a time, at seeded random intervals, until stopped."""

    def __init__(self, rig: Rig, plan: Plan) -> None:
        super().__init__(name="chaos-driver", daemon=True)
        self.rig = rig
        self.plan = plan
        self.rng = random.Random(plan.seed)
        self.faults: list[Fault] = []
        self.error: BaseException | None = None
        self.halt = threading.Event()
        self._round: list[str] = []

    def run(self) -> None:
        try:
            while not self.halt.wait(self.rng.uniform(*self.plan.gap_s)):
                self.inject(self.next_kind())
        except BaseException as exc:  # reported by the soak, which then stops
            self.error = exc

    def next_kind(self) -> str:
        """Every kind once per round, in a random order: a short soak still meets each of them."""
        if not self._round:
            self._round = self.rng.sample(self.plan.faults, len(self.plan.faults))
        return self._round.pop()

    def inject(self, kind: str) -> None:
        action = {"worker-kill": self._worker, "worker-term": self._worker, "api-kill": self._api,
                  "api-term": self._api, "redis-restart": self._redis}[kind]
        action(kind)

    def _record(self, kind: str, target: str) -> Fault:
        fault = Fault(kind, target, time.monotonic())
        self.faults.append(fault)
        progress(f"chaos: {kind} {target}")
        return fault

    def _down(self, span: tuple[float, float]) -> None:
        self.halt.wait(self.rng.uniform(*span))

    def _worker(self, kind: str) -> None:
        i = self.rng.randrange(len(self.rig.workers))
        victim = self.rig.workers[i]
        fault = self._record(kind, victim.name)
        sig = signal.SIGKILL if kind == "worker-kill" else signal.SIGTERM
        _signal(victim, sig, WORKER_GRACE_S + STOP_WAIT_S)
        self.rig.stack.stop(victim)
        self._down(self.plan.down_s)
        self.rig.workers[i] = self.rig.worker()
        fault.back = time.monotonic()

    def _api(self, kind: str) -> None:
        i = self.rng.randrange(len(self.rig.apis))
        fault = self._record(kind, f"api{i}")
        sig = signal.SIGKILL if kind == "api-kill" else signal.SIGTERM
        _signal(self.rig.apis[i], sig, API_GRACE_S + STOP_WAIT_S)
        self.rig.stack.stop(self.rig.apis[i])
        self._down(self.plan.down_s)
        self.rig.apis[i] = self.rig.api(i)
        fault.back = time.monotonic()

    def _redis(self, kind: str) -> None:
        fault = self._record(kind, "redis")
        self.rig.redis_server.kill()
        self._down(self.plan.redis_down_s)
        self.rig.redis_server.start()
        fault.back = time.monotonic()


# --- the clients ----------------------------------------------------------------

@dataclass
class Record:
    """One stream as its client saw it."""

    content: str
    tokens: int
    sid: str = ""
    outcome: str = ""  # completed, retryable_error, failed, hung
    code: str = ""
    last_seq: int = 0
    texts: list[str] = field(default_factory=list)  # every token event's text as it came, duplicates too
    times: list[float] = field(default_factory=list)  # when each new event (or the end) came
    started: float = 0.0
    connects: int = 0
    api_errors: int = 0  # an API's own retryable error (the stream went on)
    retry_s: float = RETRY_S  # the reconnection time: the server's last `retry:`, else EventSource's own

    @property
    def progress(self) -> float:
        return self.times[-1] if self.times else self.started

    def end(self, outcome: str, code: str = "") -> None:
        self.outcome, self.code = outcome, code
        self.times.append(time.monotonic())


class Clients:
    client: httpx.AsyncClient

    def __init__(self, rig: Rig, plan: Plan) -> None:
        self.urls = rig.urls
        self.plan = plan
        self.rng = random.Random(plan.seed + 1)
        self.records: list[Record] = []
        self.not_started = 0
        self.stop_at = 0.0

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.plan.streams * 2 + 8, max_keepalive_connections=0)
        timeout = httpx.Timeout(10.0, read=None)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            self.client = client
            self.stop_at = time.monotonic() + self.plan.duration_s
            await asyncio.gather(*(self.user(u) for u in range(self.plan.streams)))

    async def user(self, u: int) -> None:
        k = 0
        while time.monotonic() < self.stop_at:
            rec = Record(f"chaos {self.plan.seed} user {u} stream {k}", self.rng.randint(*self.plan.tokens))
            k += 1
            if not await self.create(rec):
                self.not_started += 1
                continue
            self.records.append(rec)
            await self.follow(rec)

    async def create(self, rec: Record) -> bool:
        body = {"messages": [{"role": "user", "content": rec.content}], "max_tokens": rec.tokens}
        give_up = time.monotonic() + CREATE_GIVE_UP_S
        while time.monotonic() < give_up:
            try:
                resp = await self.client.post(f"{self.rng.choice(self.urls)}/v1/streams", json=body)
                if resp.status_code == 201:
                    rec.sid, rec.started = str(resp.json()["id"]), time.monotonic()
                    return True
                if resp.status_code not in RETRY_STATUSES:
                    progress(f"chaos: creating a stream answered {resp.status_code} {resp.text[:200]}")
                    return False
            except httpx.HTTPError:
                pass
            await asyncio.sleep(RETRY_S)
        return False

    async def follow(self, rec: Record) -> None:
        while not rec.outcome:
            if time.monotonic() - rec.progress > self.plan.hang_after_s:
                rec.end("hung")
                return
            try:
                async with asyncio.timeout_at(self._deadline(rec)) as watchdog:
                    await self.read(rec, watchdog)
            except TimeoutError:
                rec.end("hung")
                return
            except httpx.HTTPError:
                pass  # the API went away mid-response, or would not answer: reconnect
            if not rec.outcome:
                await asyncio.sleep(rec.retry_s)

    def _deadline(self, rec: Record) -> float:
        return asyncio.get_running_loop().time() + rec.progress + self.plan.hang_after_s - time.monotonic()

    async def read(self, rec: Record, watchdog: asyncio.Timeout) -> None:
        """One connection's worth of the stream (it ends at the stream's end, or for a reconnect)."""
        rec.connects += 1
        headers = {"Last-Event-ID": str(rec.last_seq)} if rec.last_seq else {}
        async with self.client.stream("GET", f"{self.rng.choice(self.urls)}/v1/streams/{rec.sid}",
                                      headers=headers) as resp:
            if resp.status_code != 200:
                await resp.aread()
                if resp.status_code not in RETRY_STATUSES:
                    rec.end("failed", f"http_{resp.status_code}")
                return
            async for ev in EventSource(resp).aiter_sse():
                if ev.retry:  # EventSource keeps the last `retry:` a server gave for every reconnect after
                    rec.retry_s = ev.retry / 1000
                if self.take(rec, ev):
                    return
                watchdog.reschedule(self._deadline(rec))

    def take(self, rec: Record, ev: ServerSentEvent) -> bool:
        """One event; True when this connection is over (the stream ended, or the API said reconnect)."""
        if not ev.data or ev.event == "queued":
            return False
        data = ev.json()
        if ev.event == "reconnect" or "seq" not in data:  # the API's own: no event of the stream's
            if ev.event == "error" and not data.get("retryable"):
                rec.end("failed", str(data.get("code")))
            rec.api_errors += ev.event == "error"
            return True
        if ev.event == "token":
            rec.texts.append(data["text"])
        seq = int(data["seq"])
        if seq <= rec.last_seq:  # a duplicate: its text was appended, as a naive client would
            return False
        rec.last_seq = seq
        if ev.event == "done":
            rec.end("completed")
        elif ev.event == "error":
            rec.end("retryable_error" if data.get("retryable") else "failed", str(data.get("code")))
        else:
            rec.times.append(time.monotonic())
        return bool(rec.outcome)


# --- the figures ------------------------------------------------------------------

def tokens_lost_doubled(rec: Record) -> tuple[int, int]:
    """Against the fake engine's text: the whole answer for a completed stream, the part sent so far for one
    that ended otherwise (a prefix of it, with nothing missing or repeated)."""
    expected = fake_tokens([{"role": "user", "content": rec.content}], rec.tokens)
    if rec.outcome != "completed":
        expected = expected[:len(rec.texts)]
    lost = doubled = 0
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=expected, b=rec.texts, autojunk=False).get_opcodes():
        if op in ("delete", "replace"):
            lost += i2 - i1
        if op in ("insert", "replace"):
            doubled += j2 - j1
    return lost, doubled


def recovery_s(fault: Fault, records: list[Record]) -> float | None:
    """From the fault to the moment every stream open at it had made progress again (None: none was open)."""
    waits = []
    for rec in records:
        if rec.outcome == "hung" or not rec.times or rec.times[0] > fault.at or rec.times[-1] <= fault.at:
            continue  # not started (no event yet), already ended, or counted as hung
        waits.append(next(t for t in rec.times if t > fault.at) - fault.at)
    return round(max(waits), 3) if waits else None


def analyse(plan: Plan, records: list[Record], faults: list[Fault], not_started: int) -> dict[str, Any]:
    outcomes = {k: sum(r.outcome == k for r in records) for k in ("completed", "retryable_error", "failed", "hung")}
    lost = doubled = received = 0
    for rec in records:
        lo, do = tokens_lost_doubled(rec)
        lost, doubled, received = lost + lo, doubled + do, received + len(rec.texts)
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in plan.faults:
        mine = [f for f in faults if f.kind == kind]
        recov = [s for s in (recovery_s(f, records) for f in mine) if s is not None]
        by_kind[kind] = {"count": len(mine), "recover_s": summary(recov),
                         "down_s": summary(f.back - f.at for f in mine if f.back)}
    failures = sorted({r.code for r in records if r.outcome in ("failed", "retryable_error")})
    result: dict[str, Any] = {
        "plan": {**asdict(plan), "faults": list(plan.faults)},
        "streams": {"started": len(records), "not_started": not_started, **outcomes},
        "tokens": {"received": received, "lost": lost, "doubled": doubled},
        "connects": sum(r.connects for r in records), "api_errors": sum(r.api_errors for r in records),
        "error_codes": failures, "faults": by_kind,
        "unfinished": [{"stream": r.sid, "outcome": r.outcome, "code": r.code, "tokens": len(r.texts)}
                       for r in records if r.outcome != "completed"][:UNFINISHED_SHOWN],
    }
    result["targets"] = [
        {"what": "streams hung", "target": "0", "value": outcomes["hung"], "met": outcomes["hung"] == 0},
        {"what": "tokens lost", "target": "0", "value": lost, "met": lost == 0},
        {"what": "tokens doubled", "target": "0", "value": doubled, "met": doubled == 0},
    ]
    return result


def chaos_table(r: dict[str, Any]) -> list[str]:
    p, s, t = r["plan"], r["streams"], r["tokens"]
    rows = [f"{p['duration_s']:g} s, {p['streams']} concurrent clients, {p['apis']} API processes, "
            f"{p['workers']} workers (fake engine, {p['rate']:g} tokens/s), seed {p['seed']}, "
            f"hung after {p['hang_after_s']:g} s without progress:", "",
            "| started | completed | retryable error | failed | hung | not started | tokens received | lost "
            "| doubled | connections | API errors resumed |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {s['started']:,} | {s['completed']:,} | {s['retryable_error']} | {s['failed']} | {s['hung']} "
            f"| {s['not_started']} | {t['received']:,} | {t['lost']} | {t['doubled']} | {r['connects']:,} "
            f"| {r['api_errors']} |", "",
            "| fault | count | down s (median) | recover s p50 | recover s max |", "|---|---:|---:|---:|---:|"]
    for kind, f in r["faults"].items():
        rec, down = f["recover_s"], f["down_s"]
        rows.append(f"| {kind} | {f['count']} | {down.get('p50', '-')} | {rec.get('p50', '-')} "
                    f"| {rec.get('max', '-')} |")
    if r["error_codes"]:
        rows += ["", "Error codes seen: " + ", ".join(f"`{c}`" for c in r["error_codes"])]
    return rows


def soak(stack: Stack, plan: Plan) -> dict[str, Any]:
    unknown = [f for f in plan.faults if f not in FAULTS]
    if unknown:
        raise BenchError(f"unknown fault {', '.join(unknown)}; choose from {', '.join(FAULTS)}")
    rig = Rig(stack, plan)
    try:
        rig.start()
        progress(f"chaos: {plan.streams} clients for {plan.duration_s:g}s; faults {', '.join(plan.faults)}")
        clients = Clients(rig, plan)
        driver = Driver(rig, plan)
        driver.start()
        try:
            asyncio.run(_clients_while(clients, driver))
        finally:
            driver.halt.set()
            driver.join(STOP_WAIT_S * 3)
        if driver.error is not None:
            raise BenchError(f"the fault driver failed: {driver.error!r}")
    finally:
        rig.close()
    result = analyse(plan, clients.records, driver.faults, clients.not_started)
    if any(r.outcome != "completed" for r in clients.records):
        kept = tempfile.mkdtemp(prefix="tokenfan-chaos-logs-")
        shutil.copytree(stack.logs, kept, dirs_exist_ok=True)
        progress(f"chaos: streams that did not complete: the processes' logs are kept in {kept}")
    print("\n".join(chaos_table(result)), flush=True)
    return result


async def _clients_while(clients: Clients, driver: Driver) -> None:
    """The clients' run; it stops early when the driver failed (the soak would measure nothing)."""
    task = asyncio.create_task(clients.run())
    while not task.done():
        await asyncio.wait([task], timeout=1.0)
        if driver.error is not None:
            task.cancel()
    await asyncio.gather(task, return_exceptions=driver.error is not None)


def default_plan(duration_s: float | None, streams: int | None, seed: int, faults: str | None,
                 quick: bool) -> Plan:
    """The command line's plan: `--quick` is a short soak with a few clients and faster leases."""
    kinds = tuple(f.strip() for f in faults.split(",") if f.strip()) if faults else FAULTS
    if quick:
        return Plan(duration_s or 40.0, streams or 8, seed, kinds, gap_s=(3.0, 6.0), lease_ttl_s=1.5,
                    keeper_interval_s=0.25, redis_down_s=(1.0, 4.0))
    return Plan(duration_s or DURATION_S, streams or STREAMS, seed, kinds)

