"""Continuous batching: N streams decoded together from one llama.cpp model.

llama-cpp-python's high-level `Llama` decodes one sequence at a time, so this
engine drives llama.cpp's own batch API through the low-level bindings, as
llama-server's slots do (tools/server/server-context.cpp), in our own code:

- **Slots.** One context with `n_seq_max = slots`; slot *i* owns KV sequence
  *i*. A stream is admitted into a free slot and holds it until it ends.
- **One step, one `llama_decode`.** Each step puts every generating stream's
  last sampled token in the batch, then prompt tokens of the streams still
  prefilling, at most `chunk` of them per step. A new stream therefore joins a
  running batch at the next step and stalls the others by one chunk at most;
  a long prompt is fed over several steps.
- **One sampler chain per stream** (`llama_sampler_sample` on the stream's own
  logits row): its own temperature, top_p and seed, the same chain
  llama-cpp-python's `create_completion` builds (top-k 40, top-p, min-p 0.05,
  temperature, dist; greedy at temperature 0), so answers read as before.
  A request that asks for them gets, ahead of that chain and in llama.cpp's
  own order (common/sampling.cpp): `logit_bias`, the presence and frequency
  penalties (over every token it generated), and the grammar of its
  `response_format` (shared/structured.py), which masks every token the JSON
  cannot go on with before top-k looks at them. A request that asks for none
  gets exactly the chain above: nothing is added to its step.
- **A grammar's cost is bounded per token** (issue 27): a grammar stream is
  sampled by hand around its grammar, which sees the likeliest tokens first,
  each of its calls made on a thread of its own and timed against the
  token's budget; a stream past it ends with `grammar_too_slow` and the
  batch goes on (`GrammarThread`, `_constrained`).
- **Log probabilities**, when asked for: the log-softmax of the stream's raw
  logits row (the model's distribution, before penalties, grammar or
  temperature, as vLLM's and OpenAI's are), for the sampled token and the
  top N; computed with numpy on the row llama.cpp left, only for those streams.
- **Prompt-cache reuse.** A slot remembers the tokens its KV sequence holds
  after its stream ends. A new stream goes to the free slot whose tokens share
  the longest prefix with its prompt (least recently used on a tie, as
  llama-server picks), drops the rest with `llama_memory_seq_rm` and decodes
  only the new suffix: the next turn of a chat skips its whole history.
- **Text.** Token bytes pass through an incremental UTF-8 decoder (a
  character split over two tokens is sent whole), and text that may be the
  start of a stop sequence is held back until it is known not to be one.

The KV cache: `n_ctx` stays one stream's context; the context holds
`n_ctx * slots` cells as `slots` separate sequences of `n_ctx` each
(`kv_unified = false`, what `llama-server -np N` does), so llama.cpp itself
guarantees a stream its room whatever the others hold, and a stream's
attention reads its own cells only: its greedy text is the same alone and in
a batch. A unified pool (`unified=True`) broke that (attention over the
shared, masked pool rounds differently with the others' cells present: two
of four greedy answers changed) and was no faster: measured on this
machine's 2 CPUs, 8 streams x 24 tokens, prompts included, n_ctx 2048, two
rounds: split 57 and 60 tokens/s, unified 51 and 54, one slot 54 and 55.

All calls come from one thread (the worker's main loop): llama.cpp contexts
are not thread-safe, and nothing here locks. The one exception is a grammar's
own calls, on the grammar thread while the main loop waits for them: they
touch the grammar, its candidates and the vocabulary, never the context.

One module past 400 lines on purpose: the slots, the step, the samplers and the
grammar thread share one llama.cpp context and batch, which only this module
touches through the low-level bindings.
"""

from __future__ import annotations

import codecs
import ctypes
import functools
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenfan.shared import structured, tools
from tokenfan.shared.defaults import GRAMMAR_TOKEN_BUDGET_S, LEFTOVER_NICE
from tokenfan.shared.errors import ConfigError, ContextLengthExceeded, EngineError, InvalidRequest
from tokenfan.shared.events import FinishReason
from tokenfan.worker import cpu
from tokenfan.worker.engines import CHATML, Admission, GenRequest, LogProb, Output, StepStats, choice_key
from tokenfan.worker.llamalog import LlamaLog

log = logging.getLogger(__name__)

# Prompt tokens fed per step, across all prefilling streams: running streams
# wait at most this much prefill per token (about 0.1-0.2 s on 2 CPUs with
# the 135M model), while a new prompt still goes in large, efficient pieces.
PROMPT_CHUNK = 256
# The sampler chain of llama-cpp-python's create_completion, whose defaults
# the worker used before batching: the same answers at the same settings.
TOP_K = 40
MIN_P = 0.05
# Bytes of one token's text; longer pieces are asked for again at their size.
PIECE_BUF = 64
# The likeliest tokens a grammar sees first (`_constrained`): its work grows with the candidates it
# walks, so 256 of SmolLM2's 49,152 cost about 1/190 of the whole vocabulary, and top-k (40) never
# looks further down while enough of them are allowed.
GRAMMAR_CANDIDATES = 256
# ...and, when none of those is allowed, the rest a call at a time: the time is checked between calls.
GRAMMAR_CHUNK = 4096


class TextOut:
    """Token bytes to text pieces: whole UTF-8 characters, never part of a stop sequence."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""

    def push(self, data: bytes) -> tuple[str, bool]:
        """Text that is safe to send now, and whether a stop sequence was reached (it is cut off)."""
        held = self._held + self._utf8.decode(data)
        cut = min((i for i in (held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return held[:cut], True
        keep = max((_overlap(held, s) for s in self.stops), default=0)
        self._held = held[len(held) - keep:] if keep else ""
        return held[:len(held) - keep], False

    def flush(self) -> str:
        """What is held back, at the end of the stream."""
        out, self._held = self._held + self._utf8.decode(b"", final=True), ""
        return out


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of `text` that is a start of `stop`."""
    for k in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-k:]):
            return k
    return 0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(eq=False)
class Slot:
    """One KV sequence: the tokens it holds, when it was last used, and its stream."""

    seq: int
    tokens: list[int] = field(default_factory=list)
    used: float = 0.0
    stream: Stream | None = None


@dataclass(eq=False)
class Sampler:
    """A stream's samplers. Without a grammar, `main` is the whole chain, sampled in one call. With one,
    `pre` (logit bias, penalties) and `main` (top-k … dist) go around the grammar, which is kept apart
    so that it sees the likeliest tokens first and its time is measured (`LlamaBatchEngine._constrained`)."""

    main: Any
    grammar: Any = None
    pre: Any = None
    param: str = ""  # the request part the grammar came from: response_format or tools

    def handles(self) -> list[Any]:
        return [h for h in (self.pre, self.grammar, self.main) if h is not None]


class GrammarTooSlow(InvalidRequest):
    """A stream's grammar took more than its per-token budget: the stream ends, not the batch."""

    code = "grammar_too_slow"


@dataclass(eq=False)
class Stream:
    key: str
    slot: Slot
    pending: list[int]
    sampler: Sampler | None
    text: TextOut
    budget: int
    generated: int = 0
    next_token: int = -1  # sampled, not yet decoded
    logprobs: int | None = None  # alternatives per token; None: none computed
    held: list[LogProb] = field(default_factory=list)  # logprobs of tokens whose text is held back
    owner: str = ""  # the stream this is a choice of
    index: int = 0
    forks: list[Stream] = field(default_factory=list)  # choices waiting for this one's prompt, to copy it
    tool_sampler: Sampler | None = None  # tool_choice "auto": the calls' sampler, if the first token starts one
    decide_raw: bool = False  # ... and the first token is chosen on the raw logits (a JSON answer's chain)


def pick_slot(slots: Sequence[Slot], prompt: Sequence[int]) -> Slot | None:
    """The free slot sharing the longest prefix with the prompt; least recently used on a tie."""
    free = [s for s in slots if s.stream is None]
    if not free:
        return None
    return max(free, key=lambda s: (common_prefix(s.tokens, prompt), -s.used))


@dataclass(eq=False)
class _Call:
    fn: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    result: Any = None
    error: BaseException | None = None
    cleanup: Callable[[Any], Any] | None = None  # set when the caller stopped waiting: run once it ends


class GrammarThread:
    """llama.cpp's grammar calls, made on a daemon thread that the main loop waits for with a timeout.

    A grammar call runs in C and cannot be stopped from Python; but ctypes lets go of the GIL for the
    call, so the main loop can stop *waiting* for it. A call past its stream's budget is left to finish
    on its own: its thread is told to end after it, a new thread serves the next calls, and what the
    call uses (the stream's grammar) is freed by that thread when the call returns (`cleanup`), never
    while it runs. A grammar call reads only its grammar, its candidates and the model's vocabulary
    (which stays loaded while any call runs), never the context the main thread decodes with. The
    price of a call left running is a CPU core until it ends, which may be minutes: its thread drops
    to the lowest CPU priority (`LEFTOVER_NICE`), so it gets only what the decoding threads leave
    idle; `running` counts them."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Call | None] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.running = 0  # calls left running past their budget

    def call(self, fn: Callable[[], Any], timeout: float,
             cleanup: Callable[[Any], Any]) -> tuple[bool, Any]:
        """(True, its result) when `fn` returned within `timeout` seconds; else (False, None), and
        `cleanup(result)` runs on the thread when it does return."""
        if self._jobs is None:
            self._jobs = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._serve, args=(self._jobs,), name="tokenfan-grammar",
                                            daemon=True)
            self._thread.start()
        job = _Call(fn)
        self._jobs.put(job)
        job.done.wait(max(0.0, timeout))
        with job.lock:
            if not job.done.is_set():
                job.cleanup = cleanup
                with self._lock:
                    self.running += 1
                self._jobs.put(None)  # that thread ends after this call; the next call gets a new one
                self._jobs = None
                _demote(self._thread)
                return False, None
        if job.error is not None:
            raise job.error
        return True, job.result

    def _serve(self, jobs: queue.SimpleQueue[_Call | None]) -> None:
        while (job := jobs.get()) is not None:
            try:
                job.result = job.fn()
            except BaseException as exc:  # handed to the caller, which raises it
                job.error = exc
            with job.lock:
                job.done.set()
                late = job.cleanup
            if late is not None:
                log.warning("Batch engine: a grammar call left running past its budget has ended")
                late(job.result)
                with self._lock:
                    self.running -= 1


def _demote(thread: threading.Thread | None) -> None:
    """The lowest CPU priority for a thread left running a grammar call (Linux keeps a nice value per
    thread; raising it needs no privilege). Where that fails, the call still ends on its own."""
    if thread is None or thread.native_id is None:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, thread.native_id, LEFTOVER_NICE)
    except OSError as exc:
        log.debug("Batch engine: could not lower the priority of a grammar call left running: %s", exc)


class LlamaBatchEngine:
    """llama.cpp through llama-cpp-python's bindings: one model, `slots` streams per `llama_decode`."""

    name = "llama"

    def __init__(self, model_path: Path, *, n_ctx: int, slots: int, threads: int, n_gpu_layers: int,
                 chunk: int = PROMPT_CHUNK, unified: bool = False, repack: cpu.Repack = "auto",
                 grammar_budget_s: float = GRAMMAR_TOKEN_BUDGET_S,
                 grammar_limits: structured.Limits = structured.DEFAULT_LIMITS) -> None:
        import llama_cpp
        import numpy

        self.ll: Any = llama_cpp
        self.np: Any = numpy
        self.llama_log = LlamaLog(llama_cpp)
        self.llama_log.install()
        llama_cpp.llama_backend_init()
        self.n_ctx = n_ctx
        self.chunk = max(1, chunk)
        self.slot_list = [Slot(i) for i in range(slots)]
        self.streams: dict[str, Stream] = {}
        self.last = StepStats()
        self.prefilled_tokens = 0
        self._ready: list[Output] = []
        self._touched: list[Stream] = []
        self._load(model_path, n_gpu_layers, threads, unified, self._extra_bufts(repack, n_gpu_layers))
        self._formatter = self._chat_formatter()
        self.grammar_budget_s = grammar_budget_s
        self.grammar_limits = grammar_limits  # a job's schema is checked again by the API's limits
        self.grammar_thread = GrammarThread()
        # The candidates a grammar stream's token is drawn from, made once (one thread samples them all).
        self._cand_full = (llama_cpp.llama_token_data * self.n_vocab)()
        self._ids = numpy.arange(self.n_vocab, dtype=numpy.int32)

    # --- setup -------------------------------------------------------------

    def _extra_bufts(self, repack: cpu.Repack, n_gpu_layers: int) -> bool:
        """llama.cpp's CPU repacking and AMX buffers on or off (worker/cpu.py), said in the log with the CPU's
        features and what llama.cpp was built with."""
        flags = cpu.read_cpu_flags()
        info = self.ll.llama_print_system_info().decode("utf-8", "replace")
        choice = cpu.choose(repack, flags, info)
        log.info("CPU features: %s; llama.cpp: %s", cpu.shown(flags), " ".join(info.split()))
        log.info("CPU weight repacking and AMX buffers: %s%s", choice.reason,
                 " (only the layers left on the CPU)" if n_gpu_layers else "")
        return choice.extra_bufts

    def _load(self, path: Path, n_gpu_layers: int, threads: int, unified: bool, extra_bufts: bool) -> None:
        ll = self.ll
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        if not extra_bufts and "use_extra_bufts" not in dict(type(mparams)._fields_):
            raise ConfigError("TOKENFAN_CPU_REPACK: this llama-cpp-python cannot turn extra buffer types off (no "
                              "use_extra_bufts); upgrade it", param="cpu_repack")
        mparams.use_extra_bufts = extra_bufts
        self.llama_log.clear()
        self.llama_log.quiet = True
        try:
            self.model = ll.llama_model_load_from_file(str(path).encode(), mparams)
        finally:
            self.llama_log.quiet = False
        if not self.model:
            why = self.llama_log.errors()
            raise ConfigError(f"TOKENFAN_MODEL_PATH: llama.cpp cannot load {path}" + (f": {why[0]}" if why else ""),
                              code="model_load_failed", param="model_path")
        sizes = self.llama_log.buffers()
        log.info("Model weights by buffer type: %s",
                 ", ".join(f"{name} {mib:.1f} MiB" for name, mib in sizes.items()) or "not reported")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self.vocab))
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = self.n_ctx * len(self.slot_list)
        cparams.n_seq_max = len(self.slot_list)
        cparams.n_batch = self.chunk + len(self.slot_list)
        cparams.n_ubatch = min(cparams.n_batch, 512)
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = unified
        self.ctx = ll.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            ll.llama_model_free(self.model)
            raise EngineError("llama.cpp could not create a context (out of memory?)", code="model_load_failed")
        self.mem = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(cparams.n_batch, 0, 1)
        self._piece_buf = ctypes.create_string_buffer(PIECE_BUF)
        log.info("Batch engine: %d slots of %d tokens (KV %s, %d cells), %d prompt tokens per step",
                 len(self.slot_list), self.n_ctx, "unified" if unified else "per slot",
                 self.ll.llama_n_ctx(self.ctx), self.chunk)

    def _chat_formatter(self) -> Any:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self._meta("tokenizer.chat_template") or CHATML
        self._knows_tools = tools.template_knows_tools(template)
        eos = self._piece(self.ll.llama_vocab_eos(self.vocab), special=True).decode("utf-8", "ignore")
        bos = self._piece(self.ll.llama_vocab_bos(self.vocab), special=True).decode("utf-8", "ignore")
        return Jinja2ChatFormatter(template, eos, bos)

    def _meta(self, key: str) -> str:
        buf = ctypes.create_string_buffer(1 << 16)
        n = self.ll.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            n = self.ll.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n > 0 else ""

    def close(self) -> None:
        for key in list(self.streams):
            self.drop(key)
        if self.ctx:
            self.ll.llama_batch_free(self.batch)
            self.ll.llama_free(self.ctx)
            if self.grammar_thread.running:  # a call left running still reads the vocabulary: the process
                log.warning("Batch engine: %d grammar calls still running; the model stays loaded until exit",
                            self.grammar_thread.running)
            else:
                self.ll.llama_model_free(self.model)
            self.ctx = self.model = None

    # --- text ----------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        room = len(data) + 8
        buf = (self.ll.llama_token * room)()
        n = self.ll.llama_tokenize(self.vocab, data, len(data), buf, room, add_special, True)
        if n < 0:
            raise EngineError(f"llama.cpp could not tokenize the prompt ({n})")
        return list(buf[:n])

    def _piece(self, token: int, special: bool = False) -> bytes:
        if token < 0:
            return b""
        buf = self._piece_buf
        n = self.ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def _prompt(self, req: GenRequest) -> tuple[list[int], list[str]]:
        if req.prompt is not None:  # a text completion: the prompt as it is, ended by the model's EOS only
            tokens = self.tokenize(req.prompt + req.prefix, add_special=True)
            if len(tokens) >= self.n_ctx:
                raise ContextLengthExceeded(f"the prompt has {len(tokens)} tokens; the model's context is "
                                            f"{self.n_ctx}")
            return tokens, list(req.stop)
        messages, spec = tools.render(req.messages, req.tools, self._knows_tools)
        res: Any = self._formatter(messages=messages, tools=spec) if spec else self._formatter(messages=messages)
        tokens = self.tokenize(res.prompt + req.prefix, add_special=not res.added_special)
        stops = [res.stop] if isinstance(res.stop, str) else list(res.stop or [])
        if len(tokens) >= self.n_ctx:
            raise ContextLengthExceeded(f"the prompt has {len(tokens)} tokens; the model's context is {self.n_ctx}")
        return tokens, [*req.stop, *stops]

    def prompt_tokens(self, req: GenRequest) -> int:
        return len(self._prompt(req)[0])

    # --- streams -------------------------------------------------------------

    @property
    def slots(self) -> int:
        return len(self.slot_list)

    def free(self) -> int:
        return sum(s.stream is None for s in self.slot_list)

    def active(self) -> int:
        return len(self.streams)

    def admit(self, key: str, req: GenRequest) -> Admission:
        """Give the stream a free slot per choice (the caller checked `free()`); its prompt is fed from the
        next step. The choices of a fresh request with n > 1 share the prompt: it is decoded once, in the
        first one's slot, and copied into the others' (`llama_memory_seq_cp`) when it is whole."""
        if any(s.owner == key for s in self.streams.values()):
            raise EngineError(f"stream {key} is already being generated")
        if self.free() < req.slots_needed():
            raise EngineError("no free slot", code="no_free_slot")
        if req.choices is not None:
            adms = [self._admit_one(key, i, req.choice(i, text, done))[1] for i, text, done in req.choices]
            return Admission(adms[0].prompt_tokens, sum(a.cached_tokens for a in adms))
        first, adm = self._admit_one(key, 0, req)
        for i in range(1, req.n):
            self._fork(first, i, req.choice(i, req.prefix, req.prefix_tokens))
        return adm

    def _admit_one(self, owner: str, index: int, req: GenRequest) -> tuple[Stream, Admission]:
        tokens, stops = self._prompt(req)
        slot = pick_slot(self.slot_list, tokens)
        if slot is None:
            raise EngineError("no free slot", code="no_free_slot")
        sampler, tool_sampler = self._samplers(req)
        cached = self._reuse(slot, tokens)
        budget = min(req.max_tokens - req.prefix_tokens, self.n_ctx - len(tokens))
        stream = Stream(choice_key(owner, index), slot, tokens[cached:], sampler, TextOut(stops), budget,
                        logprobs=req.logprobs, owner=owner, index=index, tool_sampler=tool_sampler,
                        decide_raw=tool_sampler is not None and req.json_schema is not None)
        slot.stream = stream
        self.streams[stream.key] = stream
        if budget <= 0:
            self._ready.append(self._end(stream, FinishReason.LENGTH, ""))
        return stream, Admission(len(tokens), cached)

    def _fork(self, first: Stream, index: int, req: GenRequest) -> None:
        """A choice that waits for `first`'s prompt: nothing of its own to decode until then."""
        slot = pick_slot(self.slot_list, first.slot.tokens)
        if slot is None:
            raise EngineError("no free slot", code="no_free_slot")
        stops = first.text.stops
        sampler, tool_sampler = self._samplers(req)
        stream = Stream(choice_key(first.owner, index), slot, [], sampler, TextOut(stops), first.budget,
                        logprobs=req.logprobs, owner=first.owner, index=index, tool_sampler=tool_sampler,
                        decide_raw=first.decide_raw)
        slot.stream = stream
        self.streams[stream.key] = stream
        if first.budget <= 0:
            self._ready.append(self._end(stream, FinishReason.LENGTH, ""))
        else:
            first.forks.append(stream)

    def _copy_prompt(self, first: Stream, fork: Stream, row: int) -> Output:
        """`first`'s prompt is decoded: the fork's slot gets a copy of its KV cells, and samples its
        first token from the same logits row."""
        ll = self.ll
        ll.llama_memory_seq_rm(self.mem, fork.slot.seq, -1, -1)
        ll.llama_memory_seq_cp(self.mem, first.slot.seq, fork.slot.seq, -1, -1)
        fork.slot.tokens = list(first.slot.tokens)
        return self._sample(fork, row)

    def _reuse(self, slot: Slot, tokens: list[int]) -> int:
        """Keep the slot's cached prefix of this prompt (at least one token is left to decode, for its logits)."""
        keep = min(common_prefix(slot.tokens, tokens), len(tokens) - 1)
        if keep < len(slot.tokens) and not self.ll.llama_memory_seq_rm(self.mem, slot.seq, keep, -1):
            self.ll.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
            keep = 0
        del slot.tokens[keep:]
        return keep

    def _samplers(self, req: GenRequest) -> tuple[Any, Any]:
        """The stream's chain, and with tool_choice "auto" the chain of calls its first token may switch to.
        A call is under the tools' grammar from its first token: with "required", and in a continuation
        of text that began one; a continuation of text is text."""
        if not req.tools:
            return self._sampler(req), None
        calls = _tools_grammar(json.dumps(req.tools), req.max_calls)
        if req.tool_choice == "required" or req.prefix.startswith(tools.OPEN):
            return self._sampler(req, calls), None
        if req.prefix:
            return self._sampler(req), None
        plain = self._sampler(req)
        try:
            return plain, self._sampler(req, calls)
        except BaseException:
            self._free(plain)
            raise

    def _sampler(self, req: GenRequest, tool_grammar: str | None = None) -> Sampler:
        ll = self.ll
        smp = Sampler(ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params()))
        try:
            self._constraints(smp, req, tool_grammar)
            self._tail(smp.main, req)
        except BaseException:
            self._free(smp)
            raise
        return smp

    def _tail(self, chain: Any, req: GenRequest) -> None:
        ll = self.ll
        if req.temperature <= 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
            return
        seed = ll.LLAMA_DEFAULT_SEED if req.seed is None else req.seed & 0xFFFFFFFF
        for s in (ll.llama_sampler_init_top_k(TOP_K), ll.llama_sampler_init_top_p(req.top_p, 1),
                  ll.llama_sampler_init_min_p(MIN_P, 1), ll.llama_sampler_init_temp(req.temperature),
                  ll.llama_sampler_init_dist(seed)):
            ll.llama_sampler_chain_add(chain, s)

    def _constraints(self, smp: Sampler, req: GenRequest, tool_grammar: str | None) -> None:
        """What the request asked for beyond temperature and top_p, first: in the chain, or with a grammar
        in `pre`; a continued stream's penalties and grammar first see the text already sent."""
        ll = self.ll
        if tool_grammar is not None:
            smp.grammar, smp.param = self._grammar_of(tool_grammar, "tools"), "tools"
        elif req.json_schema is not None:
            smp.grammar, smp.param = self._grammar(req.json_schema), "response_format"
        first = smp.main
        if smp.grammar is not None:
            first = smp.pre = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        bias = {t: b for t, b in req.logit_bias.items() if 0 <= t < self.n_vocab}
        if bias:
            arr = (ll.llama_logit_bias * len(bias))()
            for i, (tok, b) in enumerate(bias.items()):
                arr[i].token, arr[i].bias = tok, b
            ll.llama_sampler_chain_add(first, ll.llama_sampler_init_logit_bias(self.n_vocab, len(bias), arr))
        if req.presence_penalty or req.frequency_penalty:
            window = max(1, req.max_tokens)  # every generated token counts, as OpenAI's penalties do
            ll.llama_sampler_chain_add(first, ll.llama_sampler_init_penalties(
                self.n_vocab, window, 1.0, req.frequency_penalty, req.presence_penalty))
        if req.prefix and (smp.grammar is not None or req.presence_penalty or req.frequency_penalty):
            self._accept_prefix(smp, self.tokenize(req.prefix, add_special=False))

    def _grammar(self, schema: dict[str, Any]) -> Any:
        try:
            text = _schema_grammar(json.dumps(schema), self.grammar_limits)
        except structured.SchemaError as exc:
            raise InvalidRequest(f"response_format: {exc}", code="invalid_request") from None
        return self._grammar_of(text, "response_format")

    def _grammar_of(self, text: str, param: str) -> Any:
        """llama.cpp's grammar sampler (its parser and first stacks run on the grammar thread, bounded by
        the budget like a token)."""
        ll, vocab = self.ll, self.vocab
        done, smpl = self.grammar_thread.call(lambda: ll.llama_sampler_init_grammar(vocab, text.encode(), b"root"),
                                              self.grammar_budget_s, lambda made: made and ll.llama_sampler_free(made))
        if not done:
            raise GrammarTooSlow(f"{param}: llama.cpp took over {self.grammar_budget_s:g} s to set its grammar up; "
                                 "simplify the schema, its patterns and enums", param=param)
        if not smpl:
            raise InvalidRequest(f"{param}: llama.cpp could not parse the grammar", code="invalid_request",
                                 param=param)
        return smpl

    def _accept_prefix(self, smp: Sampler, tokens: list[int]) -> None:
        """Feed the text already sent through the samplers. llama.cpp's grammar aborts the process on a
        token it does not allow, so each is first offered to the grammar alone."""
        ll = self.ll
        one = (ll.llama_token_data * 1)()
        cand = ll.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
        for tok in tokens:
            if smp.grammar is not None:
                one[0].id, one[0].logit, one[0].p = tok, 0.0, 0.0
                cand.size = 1
                spent = self._grammar_call(smp, ll.llama_sampler_apply, (smp.grammar, ctypes.byref(cand)), 0.0)
                if math.isinf(one[0].logit):
                    raise EngineError("the JSON sent so far cannot be continued", code="engine_error")
                self._grammar_call(smp, ll.llama_sampler_accept, (smp.grammar, tok), spent)
            for h in (smp.pre, smp.main):
                if h is not None:
                    ll.llama_sampler_accept(h, tok)

    def _free(self, smp: Sampler | None) -> None:
        for h in smp.handles() if smp is not None else []:
            self.ll.llama_sampler_free(h)

    def drop(self, key: str) -> None:
        """End a stream now (cancelled, fenced, handed back), every choice of it; what their slots decoded
        stays cached."""
        for stream in [s for s in self.streams.values() if s.owner == key]:
            self._end(stream, FinishReason.CANCELLED, "")

    def _end(self, stream: Stream, reason: FinishReason | None, text: str) -> Output:
        """The stream leaves its slot; its last output (`reason` None: it ends in an error the caller sets)."""
        self._free(stream.sampler)
        self._free(stream.tool_sampler)
        stream.sampler = stream.tool_sampler = None
        stream.slot.stream = None
        stream.slot.used = time.monotonic()
        self.streams.pop(stream.key, None)
        return Output(stream.owner, text, reason, index=stream.index)

    # --- the step ------------------------------------------------------------

    def step(self) -> list[Output]:
        """One `llama_decode` over every active stream; what each produced."""
        t0 = time.perf_counter()
        outs, self._ready = self._ready, []
        rows, stats = self._fill()
        if not self.batch.n_tokens:
            self.last = StepStats()
            return outs
        rc = self.ll.llama_decode(self.ctx, self.batch)
        if rc != 0:
            outs += self._failed(rc)
        else:
            for s, row in rows:
                forks, s.forks = s.forks, []
                outs.append(self._sample(s, row))
                outs += [self._copy_prompt(s, f, row) for f in forks if f.sampler is not None]
        stats.seconds = time.perf_counter() - t0
        self.last = stats
        self.prefilled_tokens += stats.prefill
        return outs

    def _fill(self) -> tuple[list[tuple[Stream, int]], StepStats]:
        """The batch: each generating stream's last token, then prompt tokens up to the chunk.

        Returns the streams to sample (with their logits row); `self._touched` is every stream in the batch.
        """
        self.batch.n_tokens = 0
        rows: list[tuple[Stream, int]] = []
        stats = StepStats()
        self._touched = [s for s in self.streams.values() if s.next_token >= 0]
        for s in self._touched:
            rows.append((s, self._add(s, s.next_token, True)))
            s.next_token = -1
        stats.decode = len(rows)
        budget = self.chunk
        for s in self.streams.values():
            if budget <= 0:
                break
            if not s.pending:
                continue
            take, s.pending = s.pending[:budget], s.pending[budget:]
            for j, tok in enumerate(take):
                row = self._add(s, tok, not s.pending and j == len(take) - 1)
            if not s.pending:
                rows.append((s, row))
            self._touched.append(s)
            budget -= len(take)
            stats.prefill += len(take)
        stats.streams = len(self._touched)
        return rows, stats

    def _add(self, s: Stream, token: int, logits: bool) -> int:
        b, i = self.batch, int(self.batch.n_tokens)
        b.token[i] = token
        b.pos[i] = len(s.slot.tokens)
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = s.slot.seq
        b.logits[i] = logits
        b.n_tokens = i + 1
        s.slot.tokens.append(token)
        return i

    def _decide(self, s: Stream, row: int) -> int:
        """tool_choice "auto", the first token: one that starts with `<` begins a call, and the call's
        sampler (its grammar) takes over from here, sampling the token again; any other is text, under the
        plain sampler alone. A JSON answer's sampler could never start with `<`, so then the model's
        likeliest token (raw logits) decides."""
        plain, calls = s.sampler, s.tool_sampler
        if plain is None or calls is None:
            raise EngineError(f"stream {s.key} has no sampler to decide with")
        s.tool_sampler = None
        if s.decide_raw:
            logits = self.np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))
            call = self._piece(int(logits.argmax())).lstrip(b" ").startswith(b"<")
        else:
            tok = self._draw(plain, row)
            call = self._piece(tok).startswith(b"<")
            if not call:
                self._free(calls)
                return tok
        keep, drop = (calls, plain) if call else (plain, calls)
        self._free(drop)
        s.sampler = keep
        return self._draw(keep, row)

    def _draw(self, smp: Sampler | None, row: int) -> int:
        if smp is None:
            raise EngineError("a stream in the batch has no sampler")
        if smp.grammar is None:
            return int(self.ll.llama_sampler_sample(smp.main, self.ctx, row))
        return self._constrained(smp, row)

    def _constrained(self, smp: Sampler, row: int) -> int:
        """One token under a grammar, its grammar work bounded by `grammar_budget_s` (issue 27).

        What bounds the worst case: every grammar call (here, its acceptance, its set-up in
        `_grammar_of`, a takeover's prefix) runs on `GrammarThread`, and the main loop waits for it only
        as long as the token's budget has left; a call past it is left running on that thread and the
        stream ends with `grammar_too_slow`. A step therefore waits at most `grammar_budget_s` for each
        grammar stream in it, whatever llama.cpp does, and cancel, the lease and SIGTERM are seen at the
        next step. What keeps the common case far below the budget: the grammar first sees only the
        `GRAMMAR_CANDIDATES` likeliest tokens (after logit bias and penalties), since its cost grows
        with the candidates it walks; when one of them is allowed it is the token the whole-vocabulary
        chain would draw at temperature 0 (the top-k chain after it draws among the allowed ones). Only
        when none is allowed does the grammar see the rest, likeliest first, `GRAMMAR_CHUNK` tokens a
        call, up to the first chunk that allows one."""
        ll, np = self.ll, self.np
        view = np.ctypeslib.as_array(self._cand_full)
        view["id"] = self._ids
        view["logit"] = np.ctypeslib.as_array(ll.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))
        view["p"] = 0.0
        if smp.pre is not None:
            arr = ll.llama_token_data_array(data=self._cand_full, size=self.n_vocab, selected=-1, sorted=False)
            ll.llama_sampler_apply(smp.pre, ctypes.byref(arr))
        k = min(GRAMMAR_CANDIDATES, self.n_vocab)
        order = np.argpartition(-view["logit"], k - 1)
        spent, tok = self._try(smp, view[order[:k]], 0.0)
        if tok < 0:  # none of the likeliest: the rest, likeliest first, a chunk at a time
            rest = order[k:][np.argsort(-view["logit"][order[k:]], kind="stable")]
            for at in range(0, len(rest), GRAMMAR_CHUNK):
                spent, tok = self._try(smp, view[rest[at:at + GRAMMAR_CHUNK]], spent)
                if tok >= 0:
                    break
            else:
                raise EngineError("the grammar allows no token here", code="engine_error")
        self._grammar_call(smp, ll.llama_sampler_accept, (smp.grammar, tok), spent)
        for h in (smp.pre, smp.main):
            if h is not None:
                ll.llama_sampler_accept(h, tok)
        return tok

    def _try(self, smp: Sampler, cands: Any, spent: float) -> tuple[float, int]:
        """The grammar over these candidates (timed), then the chain over those it allows: the time spent
        so far, and the token drawn (-1: the grammar allowed none)."""
        ll, np = self.ll, self.np
        buf = (ll.llama_token_data * len(cands)).from_buffer_copy(np.ascontiguousarray(cands).tobytes())
        arr = ll.llama_token_data_array(data=buf, size=len(cands), selected=-1, sorted=False)
        spent = self._grammar_call(smp, ll.llama_sampler_apply, (smp.grammar, ctypes.byref(arr)), spent, buf)
        if np.isinf(np.ctypeslib.as_array(buf)["logit"]).all():
            return spent, -1
        ll.llama_sampler_apply(smp.main, ctypes.byref(arr))
        return spent, int(arr.data[arr.selected].id)

    def _grammar_call(self, smp: Sampler, fn: Callable[..., Any], args: tuple[Any, ...], spent: float,
                      *keep: Any) -> float:
        """One grammar call on the grammar thread, within what is left of the token's budget: the time
        spent so far. Past the budget the call is left running, its grammar handed to the thread to free
        when it ends (it is the stream's no more), and the stream ends. `keep`: what the call's arguments
        point into (the candidates), kept alive as long as the call runs."""
        t0 = time.perf_counter()
        grammar = smp.grammar
        done, _ = self.grammar_thread.call(lambda: (fn(*args), keep)[0], self.grammar_budget_s - spent,
                                           lambda _: self.ll.llama_sampler_free(grammar))
        spent += time.perf_counter() - t0
        if not done:
            smp.grammar = None
            raise self._too_slow(smp, spent)
        if spent > self.grammar_budget_s:
            raise self._too_slow(smp, spent)
        return spent

    def _too_slow(self, smp: Sampler, seconds: float) -> GrammarTooSlow:
        return GrammarTooSlow(f"{smp.param}: its grammar takes {seconds:.2f} s or more to sample one token; the "
                              f"worker's budget is {self.grammar_budget_s:g} s (simplify the schema, its patterns "
                              "and enums)", param=smp.param)

    def _sample(self, s: Stream, row: int) -> Output:
        try:
            tok = self._decide(s, row) if s.tool_sampler is not None else self._draw(s.sampler, row)
        except GrammarTooSlow as exc:
            log.warning("Batch engine: stream %s ends: %s", s.key, exc)
            out = self._end(s, None, "")
            out.error = exc
            return out
        if self.ll.llama_vocab_is_eog(self.vocab, tok):
            return self._with_logprobs(s, self._end(s, FinishReason.STOP, s.text.flush()))
        s.generated += 1
        if s.logprobs is not None:
            s.held.append(self._logprob(row, tok, s.logprobs))
        text, stopped = s.text.push(self._piece(tok))
        if stopped:
            return self._with_logprobs(s, self._end(s, FinishReason.STOP, text))
        if s.generated >= s.budget:
            return self._with_logprobs(s, self._end(s, FinishReason.LENGTH, text + s.text.flush()))
        s.next_token = tok
        return self._with_logprobs(s, Output(s.owner, text, index=s.index))

    @staticmethod
    def _with_logprobs(s: Stream, out: Output) -> Output:
        """Text carries the logprobs of every token behind it; those of text held back wait for it (and
        the tokens of a stop sequence, which is never sent, go with it)."""
        if s.logprobs is not None and out.text:
            out.logprobs, s.held = s.held, []
        return out

    def _logprob(self, row: int, tok: int, top: int) -> LogProb:
        """The sampled token's log probability under the model (log-softmax of its raw logits row), with
        the `top` likeliest tokens."""
        np = self.np
        logits = np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))
        peak = float(logits.max())
        norm = peak + math.log(float(np.exp(logits - peak).sum()))
        entry = self._lp_entry(tok, float(logits[tok]) - norm)
        alts: list[LogProb] = []
        if top:
            idx = np.argpartition(logits, -top)[-top:]
            idx = idx[np.argsort(-logits[idx], kind="stable")]
            alts = [self._lp_entry(int(i), float(logits[i]) - norm) for i in idx]
        entry["top_logprobs"] = alts
        return entry

    def _lp_entry(self, tok: int, logprob: float) -> LogProb:
        piece = self._piece(tok)
        return {"token": piece.decode("utf-8", "replace"), "logprob": min(0.0, logprob), "bytes": list(piece)}

    def _failed(self, rc: int) -> list[Output]:
        """A failed decode: every stream in it ends with a retryable error; their slots forget their cache."""
        log.error("Batch engine: llama_decode returned %d for %d tokens", rc, self.batch.n_tokens)
        outs = []
        forks = [f for t in self._touched for f in t.forks if f.sampler is not None]
        for s in self._touched + forks:
            self.ll.llama_memory_seq_rm(self.mem, s.slot.seq, -1, -1)
            s.slot.tokens.clear()
            out = self._end(s, None, "")
            out.error = EngineError(f"llama.cpp failed to decode (code {rc})")
            outs.append(out)
        return outs


# A request's grammar text, once: its n choices (and a continuation's) each get a sampler of their own,
# but converting the schema is the same work each time. Keyed by its JSON in the order given: the
# order of an object's properties is the order the grammar writes them in.
GRAMMAR_CACHE = 64


@functools.lru_cache(maxsize=GRAMMAR_CACHE)
def _tools_grammar(tools_json: str, max_calls: int) -> str:
    return tools.grammar(json.loads(tools_json), max_calls)


@functools.lru_cache(maxsize=GRAMMAR_CACHE)
def _schema_grammar(schema_json: str, limits: structured.Limits) -> str:
    return structured.grammar(json.loads(schema_json), limits)
