"""One stream's job in the batch: from the payload to exactly one terminal event.

The scheduler (worker/scheduler.py) claims a job when a slot is free and
makes a `StreamJob`; `start` claims nothing more than the stream's lease was
already claimed for, queues `meta` (and the disclosure) and admits the
request to the engine; each step's text for the stream becomes one token
event (`token_event`); `between` runs between steps (cancel, lost lease,
shutdown grace, time limit); `finish` or `fail` queue the terminal event.
`guard` maps any failure of one stream to that stream's outcome, so it
never reaches the others in the batch.

A `StreamJob` writes no event to Redis itself: every event it makes goes
into its `history` (this attempt's events, in order), and the scheduler sends
each step what Redis has not confirmed yet (`unsent`), every slot's in one
pipelined round trip, and hands each reply to `ack`. So a Redis that is
unreachable for a while costs nothing but time: the events wait, and go
out when it answers again (for `redis_outage_s` at most). A reply that
says the log lacks events before this one (GAP: Redis restarted from an
append-only file without its last second, or a replica took over without
the last writes), or that our lease is gone (FENCED: it lapsed while Redis
was away, or the restart lost it), makes the stream `resync`: take the
lease back if nobody else took the stream on (`Leases.reclaim`), and send
again from the log's last seq. A stream's job ends once its terminal event
is confirmed (`settled`); the keeper then holds its history for
`DURABLE_AFTER_S`, in case Redis restarts without it (worker/keeper.py).

What does write to Redis here:
`Runner.reject` (claims an invalid job's stream and publishes its `error`
directly), `StreamJob.resync` (takes the lease back: `Leases.reclaim`),
`StreamJob.mark_served` (the queue's served mark), `StreamJob.hand_back`
(hands the stream back to the queue: `hand_over`) and `StreamJob.settle`
(the error record, the stream's active and lease index entries).

`run_job` is the function RQ's jobs name; the scheduler never calls it (it
runs each stream in its batch instead), so it only refuses to run outside
`tokenfan worker` (e.g. under a plain `rq worker`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import ValidationError
from rq.timeouts import JobTimeoutException

from tokenfan.shared import cancel, events, keys, tools
from tokenfan.shared.bus import SyncBus
from tokenfan.shared.errors import ContextLengthExceeded, InvalidRequest, TokenfanError
from tokenfan.shared.events import (
    CancelReason,
    ChoiceEnd,
    Disclosure,
    Done,
    Error,
    FinishReason,
    Meta,
    Timings,
    Token,
    ToolCallPiece,
    Usage,
)
from tokenfan.shared.leases import Leases
from tokenfan.shared.reaper import hand_over, record_error
from tokenfan.shared.schema import JobPayload
from tokenfan.shared.settings import WorkerSettings
from tokenfan.shared.state import AcquireResult, JobOutcome, PublishResult, StreamState
from tokenfan.worker.engines import Engine, GenRequest
from tokenfan.worker.keeper import Keeper, Watch
from tokenfan.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)


class Fenced(Exception):
    """Our lease was taken: another worker or a reaper owns the stream now."""


def run_job(payload: dict[str, Any]) -> dict[str, Any]:
    """The entry RQ's jobs name; tokenfan's scheduler runs them in its batch instead."""
    raise RuntimeError("tokenfan jobs run only inside `tokenfan worker`")


@dataclass
class Runner:
    """What every stream job of a worker shares."""

    settings: WorkerSettings
    engine: Engine
    bus: SyncBus
    keeper: Keeper
    metrics: WorkerMetrics
    name: str
    shutdown_at: float = 0.0

    def reject(self, raw: Any, exc: ValidationError) -> None:
        """An invalid payload is never run; its stream (if it names one) gets an error event."""
        sid = raw.get("stream_id") if isinstance(raw, dict) else None
        log.error("Worker %s: rejected an invalid job for stream %r: %s", self.name, sid, exc.errors()[:3])
        if not isinstance(sid, str) or not sid.replace("-", "").replace("_", "").isalnum() or len(sid) > 64:
            return
        result, seq = self.bus.leases.claim_to_end(sid, self.name, self.settings.lease_ttl_s)
        if result.claimed:
            msg = "the job's payload is not valid; it was not executed"
            self.bus.publish(sid, self.name, Error(seq + 1, "invalid_job", msg, False))
            record_error(self.bus, sid, "invalid_job", msg)


def _add_sent(sent: list[str], e: Token) -> None:
    """One token event into a choice's sent text, one entry per engine token: an event of a tool call
    may stand for several tokens (`tokens`; literal text the parser held back) or none (a second piece
    of the same token)."""
    if e.tokens == 0 and sent:
        sent[-1] += e.model_text
    else:
        sent += [e.model_text, *[""] * (e.tokens - 1)]


class StreamJob:
    """One attempt at one stream, holding its lease, in one of the engine's slots."""

    def __init__(self, runner: Runner, payload: JobPayload, watch: Watch, seq: int) -> None:
        self.r = runner
        self.p = payload
        self.watch = watch
        self.base = seq  # the log's last seq when this attempt claimed the stream
        self.history: list[events.Event] = []  # this attempt's events: seq base+1, base+2, ...
        self.confirmed = seq  # the highest seq Redis has confirmed is in the log
        self.outcome: JobOutcome | None = None  # set when the terminal event is queued
        self.error: tuple[str, str] | None = None  # the terminal error's code and message, for the ops page
        self.outage_since = 0.0  # when publishing started to fail (0: it works)
        self.sid = payload.stream_id
        self.started = time.time()
        self.first_token_at = 0.0
        self.generated = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0  # of the prompt, taken from a slot's cache instead of decoded
        self.req = GenRequest([], 1)
        self.waiting = False  # for free slots, one per choice
        self.choice_ends: dict[int, FinishReason] = {}  # the finish reason of each choice that ended (n > 1)
        self.parsers: dict[int, tools.CallParser] = {}  # per choice, when the request offers tools
        self.raw_held: dict[int, str] = {}  # raw text of a choice's calls not yet in an event
        self.tokens_held: dict[int, int] = {}  # ... and the engine's tokens behind it

    @property
    def seq(self) -> int:
        """The seq of the last event this attempt made (sent or not)."""
        return self.base + len(self.history)

    @property
    def next_seq(self) -> int:
        """The seq of the next event: what `emit` takes."""
        return self.seq + 1

    def emit(self, ev: events.Event) -> None:
        """Queue the next event (made with `next_seq`); the scheduler sends it."""
        self.history.append(ev)
        self.watch.last = ev.seq

    def unsent(self) -> list[events.Event]:
        """The events Redis has not confirmed, oldest first."""
        return self.history[self.confirmed - self.base:]

    @property
    def settled(self) -> bool:
        """The terminal event is queued and Redis confirmed it."""
        return self.outcome is not None and self.confirmed >= self.seq

    def ack(self, event: events.Event, result: PublishResult) -> bool:
        """What Redis said to one sent event; True when the stream resynced (the replies to its later
        events in the same round trip say nothing more). Raises Fenced when it is someone else's now."""
        self.outage_since = 0.0
        if result is PublishResult.PUBLISHED or result is PublishResult.CANCELLED:
            self.confirmed = max(self.confirmed, event.seq)
            if result is PublishResult.CANCELLED and self.outcome is None:
                self.finish(FinishReason.CANCELLED)
            return False
        self.resync()  # GAP or FENCED
        return True

    def resync(self) -> None:
        """Redis lost our lease or the log's end: take the stream back and send again from the log's end."""
        r = self.r
        result, last = r.bus.leases.reclaim(self.sid, r.name, r.settings.lease_ttl_s, r.name, self.p.attempt,
                                            self.base, self.seq)
        if result is AcquireResult.FINISHED and self.outcome is not None and last == self.seq:
            self.confirmed = self.seq  # our terminal event is in: the reply to it was lost
            return
        if not result.claimed:
            raise Fenced(self.sid)
        if last < self.confirmed:
            log.warning("Worker %s: Redis lost events %d-%d of stream %s; sending them again", r.name, last + 1,
                        self.confirmed, self.sid)
        self.confirmed = last

    def unreachable(self, now: float) -> bool:
        """Publishing failed; True once Redis has been unreachable for longer than `redis_outage_s`."""
        if not self.outage_since:
            self.outage_since = now
        return now - self.outage_since > self.r.settings.redis_outage_s

    def guard(self, action: Callable[..., JobOutcome | None], *args: Any) -> JobOutcome | None:
        """Run one step of this stream's life; a failure ends this stream (its outcome), never the batch."""
        try:
            return action(*args)
        except Fenced:
            log.warning("Worker %s: lost the lease of stream %s; stopping", self.r.name, self.sid)
            return JobOutcome.HANDED_OVER
        except ContextLengthExceeded as exc:
            self.fail(exc.code, exc.message, False)
        except JobTimeoutException:
            self.fail("timeout", "the job ran past its time limit", True)
        except TokenfanError as exc:
            self.fail(exc.code, exc.message, exc.retryable)
        except redis.RedisError:
            # Its lease lapses and its lease index entry stays: a reaper continues or ends it.
            log.exception("Worker %s: Redis failed during stream %s; leaving it to the reapers", self.r.name,
                          self.sid)
            return JobOutcome.ERROR
        except Exception as exc:  # the engine is third-party code: any failure ends the stream cleanly
            log.exception("Worker %s: stream %s failed", self.r.name, self.sid)
            self.fail("engine_error", f"generation failed: {type(exc).__name__}", True)
        return None

    def fail(self, code: str, message: str, retryable: bool) -> None:
        """Queue the terminal error (once); the job ends when Redis confirms it."""
        self.r.engine.drop(self.sid)
        if self.outcome is None:
            self.emit(Error(self.next_seq, code, message, retryable))
            self.outcome, self.error = JobOutcome.ERROR, (code, message)

    def start(self) -> JobOutcome | None:
        """Announce the stream and give it its slots (when they are free: else at a later `between`);
        None while it runs."""
        sent, created = self._history()
        resumed = self.seq > 0
        self.emit(Meta(self.next_seq, self.sid, self.p.model, self.r.name, created, resumed))
        if not resumed and self.p.disclosure:
            self.emit(Disclosure(self.next_seq, self.p.disclosure))
        if self.watch.cancel is not None:
            self.finish(FinishReason.CANCELLED)
            return None
        if self.p.n > self.r.engine.slots:
            raise InvalidRequest(f"n is {self.p.n}, more than the {self.r.engine.slots} slots of the worker",
                                 code="invalid_request", param="n")
        self.req = GenRequest(
            messages=[m.model_dump() for m in self.p.messages], max_tokens=self.p.max_tokens,
            temperature=self.p.temperature, top_p=self.p.top_p, stop=self.p.stop, seed=self.p.seed,
            json_schema=self.p.json_schema, logprobs=self.p.logprobs, n=self.p.n,
            presence_penalty=self.p.presence_penalty, frequency_penalty=self.p.frequency_penalty,
            logit_bias={int(k): v for k, v in self.p.logit_bias.items()},
            tools=self.p.tools, tool_choice=self.p.tool_choice, max_calls=self.p.max_calls, prompt=self.p.prompt,
        )
        if self.p.tools:  # a takeover's parsers first read the text already sent, silently
            for i in range(self.p.n):
                self.parsers[i] = tools.CallParser(auto=self.p.tool_choice == "auto")
                self.parsers[i].feed("".join(sent.get(i, [])))
        first = sent.get(0, [])
        if self.p.n == 1:
            self.req.prefix, self.req.prefix_tokens = "".join(first), len(first)
        elif self.base:  # a takeover: each unfinished choice goes on from its own text
            self.req.choices = [(i, "".join(sent.get(i, [])), len(sent.get(i, [])))
                                for i in range(self.p.n) if i not in self.choice_ends]
            if not self.req.choices:
                self.finish(self.choice_ends.get(0, FinishReason.STOP))
                return None
        self.generated = sum(len(t) for t in sent.values())
        self._admit()
        return None

    def _admit(self) -> None:
        """Into the engine once it has a slot for every choice: until then the stream waits (`waiting`)
        and the scheduler claims no other job, so that the slots free up for it."""
        self.waiting = self.r.engine.free() < self.req.slots_needed()
        if self.waiting:
            return
        admission = self.r.engine.admit(self.sid, self.req)
        self.prompt_tokens = admission.prompt_tokens
        # the usage counts one prompt (a continued n > 1 stream's choices reuse a cache each)
        self.cached_tokens = min(admission.cached_tokens, admission.prompt_tokens)
        self.r.metrics.cached_tokens.inc(admission.cached_tokens)

    def _history(self) -> tuple[dict[int, list[str]], float]:
        """Text already sent per choice, as the model wrote it (a takeover continues it), the choices that
        ended, and the stream's creation time."""
        if self.base == 0:
            return {}, self.p.enqueued_at
        done = self.r.bus.read_log(self.sid)
        sent: dict[int, list[str]] = {}
        for e in done:
            if not isinstance(e, Token):
                continue
            if e.finish_reason is not None:
                self.choice_ends[e.choice] = e.finish_reason
            else:
                _add_sent(sent.setdefault(e.choice, []), e)
        created = next((e.created for e in done if isinstance(e, Meta)), self.p.enqueued_at)
        return sent, created

    def mark_served(self) -> None:
        """The queue's served mark, for the positions of the streams still waiting (best effort)."""
        ticket = StreamState.load_ticket(self.r.bus.redis, self.sid)
        if ticket:
            self.r.bus.mark_served(self.p.model, ticket)

    def token_event(self, text: str, logprobs: list[dict[str, Any]] | None = None, index: int = 0) -> None:
        """One token event; `logprobs` (the tokens behind the text, OpenAI's shape) only when asked for,
        `index` (the choice) only when there are several."""
        if not self.first_token_at:
            self.first_token_at = time.time()
        parser = self.parsers.get(index)
        if parser is not None:
            self._pieces(parser.feed(text), logprobs, index)
            self.generated += 1
            return
        self.emit(Token(self.next_seq, text, index=self._index(index), logprobs=logprobs))
        self.generated += 1

    def _index(self, index: int) -> int | None:
        """A token event's `index`: only when there are several choices."""
        return index if self.p.n > 1 else None

    def _pieces(self, pieces: list[tools.Piece], logprobs: list[dict[str, Any]] | None, index: int,
                token: bool = True) -> None:
        """A choice's text and calls as token events: text as any token's (logprobs go with text only), a
        call's piece with `tool_call` (its index, and its id and name once), each event with the `raw`
        text behind it where that differs from `text`."""
        tokens = self.tokens_held.pop(index, 0) + token  # what the first event stands for (`tokens` when not 1)
        for piece in pieces:
            raw = self.raw_held.pop(index, "") + piece.raw
            call = self._call(piece, index)
            if call is None and not piece.text:
                self.raw_held[index] = raw  # literal text of the block: it goes with the next event
                continue
            lp = None
            if logprobs is not None and piece.text:
                lp, logprobs = logprobs, None
            self.emit(Token(self.next_seq, piece.text, tool_call=call, raw_text=None if raw == piece.text else raw,
                            tokens=tokens, index=self._index(index), logprobs=lp))
            tokens = 0
        if tokens:
            self.tokens_held[index] = tokens

    def _call(self, piece: tools.Piece, index: int) -> ToolCallPiece | None:
        """A piece of a call as the token event's `tool_call`; None when it is text, or says nothing."""
        if piece.call is None or (piece.name is None and not piece.arguments):
            return None
        if piece.name is None:
            return ToolCallPiece(piece.call, piece.arguments)
        return ToolCallPiece(piece.call, piece.arguments, tools.call_id(self.sid, index, piece.call), piece.name)

    def choice_done(self, index: int, reason: FinishReason) -> None:
        """One choice ended; the stream ends with its last. With several choices each end is a token
        event with no text and its `finish_reason`, so a takeover does not go on with it. An answer
        that made calls and stopped ends with `tool_calls`."""
        parser = self.parsers.get(index)
        if parser is not None and self.outcome is None and index not in self.choice_ends:
            self._pieces(parser.finish(), None, index, token=False)
            if parser.calls and reason is FinishReason.STOP:
                reason = FinishReason.TOOL_CALLS
        if self.p.n == 1:
            self.finish(reason)
            return
        if self.outcome is not None or index in self.choice_ends:
            return
        self.choice_ends[index] = reason
        self.emit(Token(self.next_seq, "", index=index, finish_reason=reason))
        if len(self.choice_ends) == self.p.n:
            self.finish(self.choice_ends.get(0, reason))

    def between(self) -> JobOutcome | None:
        """Between two steps: what the keeper saw, the shutdown grace, the time limit."""
        if self.watch.lost:
            raise Fenced(self.sid)
        if self.outcome is not None:  # ended; its last events wait for Redis to confirm them
            return None
        if self.watch.cancel is not None:
            self.finish(FinishReason.CANCELLED)
            return None
        if self.waiting:
            self._admit()
        shutdown_at = self.r.shutdown_at
        if shutdown_at and time.time() - shutdown_at > self.r.settings.shutdown_grace_s:
            return self.hand_back()
        if time.time() - self.started > self.r.settings.job_timeout_s - 5:
            raise JobTimeoutException("job time limit")
        return None

    def hand_back(self) -> JobOutcome:
        self.r.engine.drop(self.sid)  # its slot must not produce another token for a stream we gave away
        payload = self.p.model_copy(update={"attempt": self.p.attempt + 1})
        if hand_over(self.r.bus, self.r.settings, self.r.name, payload):
            log.warning("Worker %s: shutting down; handed stream %s back for continuation", self.r.name, self.sid)
        return JobOutcome.HANDED_OVER

    def _cancel_reason(self) -> CancelReason:
        if self.watch.cancel is not None:
            return self.watch.cancel
        got = cancel.reason(self.r.bus.redis, self.sid)
        return CancelReason.CLIENT if got is None else got

    def finish(self, reason: FinishReason) -> None:
        """Queue the `done` event (once); the job ends when Redis confirms it."""
        self.r.engine.drop(self.sid)
        if self.outcome is not None:
            return
        now = time.time()
        gen_s = now - (self.first_token_at or now)
        choices = [ChoiceEnd(i, self.choice_ends.get(i, reason)) for i in range(self.p.n)] if self.p.n > 1 else None
        cancel = self._cancel_reason() if reason is FinishReason.CANCELLED else None
        self.emit(Done(self.next_seq, reason, Usage(self.prompt_tokens, self.generated, self.cached_tokens),
                       self._timings(now, gen_s, self.generated), choices=choices, cancel_reason=cancel))
        self.outcome = JobOutcome.CANCELLED if reason is FinishReason.CANCELLED else JobOutcome.DONE

    def settle(self) -> None:
        """The terminal event is in the log: the bookkeeping around it (best effort, Redis may be away)."""
        bus = self.r.bus
        try:
            if self.error is not None:
                record_error(bus, self.sid, *self.error)
            pipe = bus.redis.pipeline(transaction=False)
            pipe.zrem(keys.active(), self.sid)
            Leases.queue_retire(pipe, self.sid)
            pipe.execute()
        except redis.RedisError:
            log.warning("Worker %s: could not clear the records of finished stream %s", self.r.name, self.sid)

    def _timings(self, now: float, gen_s: float, tokens: int) -> Timings:
        m = self.r.metrics
        queue_wait = max(0.0, self.started - self.p.enqueued_at)
        ttft = (self.first_token_at - self.started) if self.first_token_at else 0.0
        tps = (tokens - 1) / gen_s if gen_s > 0 and tokens > 1 else 0.0
        if self.p.attempt == 0:
            m.queue_wait.observe(queue_wait)
        if self.first_token_at:
            m.ttft.observe(ttft)
        m.tokens.inc(tokens)
        if tps:
            m.tps.observe(tps)
        return Timings(round(queue_wait * 1000, 2), round(ttft * 1000, 2), round((now - self.started) * 1000, 2),
                       round(tps, 2), self.r.name)
