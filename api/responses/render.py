"""Log events in, OpenAI's Responses events and response object out (the package's docstring says how)."""

from __future__ import annotations

from typing import Any

import orjson

from tokenfan.api import sse
from tokenfan.api.responses.record import View
from tokenfan.shared import events
from tokenfan.shared.events import Done, Error, Event, FinishReason, Meta, Token, ToolCallPiece
from tokenfan.shared.state import StreamState, StreamStatus

FC_PREFIX = "fc_"
# What a disclosure or a takeover renders as: OpenAI's own mid-stream event that carries no snapshot.
KEEPALIVE = "keepalive"
# OpenAI's ResponseError codes our error codes map onto; any other is "server_error".
ERROR_CODES = {"context_length_exceeded": "invalid_prompt", "rate_limit_exceeded": "rate_limit_exceeded"}


def _final_status(end: Event) -> str:
    if not isinstance(end, Done):
        return "failed"
    if end.finish_reason is FinishReason.CANCELLED:
        return "cancelled"
    return "incomplete" if end.finish_reason is FinishReason.LENGTH else "completed"


def _usage(end: Event | None) -> dict[str, Any] | None:
    if not isinstance(end, Done):
        return None
    u = end.usage
    return {"input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.total_tokens}


def _error(end: Event | None) -> dict[str, Any] | None:
    if not isinstance(end, Error):
        return None
    return {"code": ERROR_CODES.get(end.code, "server_error"), "message": f"{end.message} ({end.code})"}


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _item_status(status: str) -> str:
    """An output item's status once its response is `status`."""
    return {"completed": "completed", "queued": "in_progress", "in_progress": "in_progress"}.get(status, "incomplete")


def response_object(view: View, status: str, output: list[dict[str, Any]], end: Event | None = None
                    ) -> dict[str, Any]:
    """OpenAI's `response` object with its output items as they are."""
    rec = view.rec
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {
        "id": view.rid, "object": "response", "created_at": int(rec.created_at), "status": status,
        "background": rec.background, "error": _error(end), "incomplete_details": incomplete,
        "instructions": rec.instructions, "max_output_tokens": rec.max_output_tokens, "metadata": rec.metadata,
        "model": rec.model, "output": output,
        "parallel_tool_calls": rec.parallel_tool_calls, "previous_response_id": rec.previous_response_id,
        "reasoning": None, "top_logprobs": rec.top_logprobs,
        "store": rec.store, "temperature": rec.temperature, "text": {"format": rec.text_format},
        "tool_choice": rec.tool_choice, "tools": rec.tools, "top_p": rec.top_p, "truncation": "disabled",
        "usage": _usage(end), "user": rec.user,
        "completed_at": int(end.ts) if end is not None and status == "completed" else None,
    }


def fold(view: View, state: StreamState, logged: list[Event]) -> dict[str, Any]:
    """The response object as the log and the state say now: the renderer's, over the whole log."""
    r = Renderer(view)
    for e in logged:
        r.render(e)
    if r.end is not None:
        return r.snapshot(_final_status(r.end), r.end)
    status = "queued" if state.status is StreamStatus.QUEUED and not logged else "in_progress"
    return r.snapshot(status)


# --- events ---------------------------------------------------------------------------------------

class Renderer:
    """Log events in, OpenAI's Responses events out, numbered 0, 1, 2, … as the module docstring says.

    It must see the log from seq 1: the numbers count every event rendered before, and the final
    events carry the whole text."""

    def __init__(self, view: View) -> None:
        self.view = view
        self.sn = -1  # the last sequence_number rendered
        self.opened = False  # meta at seq 1 seen: created and in_progress sent
        self.items: list[dict[str, Any]] = []  # the output items so far, in order
        self.open: int | None = None  # the output index of the item being written
        self.calls: dict[int, int] = {}  # a call's index in the answer -> its output index
        self.end: Event | None = None

    def render(self, e: Event) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if e.seq == 1 and isinstance(e, Meta):
            self.opened = True
            created = "queued" if self.view.rec.background else "in_progress"
            self._life(out, "response.created", created)
            self._life(out, "response.in_progress", "in_progress")
        elif e.type in (events.META, events.DISCLOSURE):  # the module's docstring says why not in_progress
            self._emit(out, {"type": KEEPALIVE})
        elif isinstance(e, Token):
            self._token(out, e)
        elif e.type in (events.DONE, events.ERROR):
            self._end(out, e)
        return out

    def snapshot(self, status: str, end: Event | None = None) -> dict[str, Any]:
        """The response object now: every item so far, with its status once the response is `status`."""
        return response_object(self.view, status, [self._settled(i, status) for i in range(len(self.items))], end)

    # -- what each log event renders --

    def _token(self, out: list[dict[str, Any]], e: Token) -> None:
        if e.tool_call is not None:
            self._call_piece(out, e.tool_call)
            return
        text = e.text
        writing = self.open is not None and self.items[self.open]["type"] == "message"
        if not text and not writing:
            return  # nothing to write (a choice's end, raw text held for the next piece)
        if not writing:
            self._close(out)
            self._open_message(out)
        idx = len(self.items) - 1  # the message being written is the last item
        part = self.items[idx]["content"][0]
        lp = e.logprobs or []
        part["text"] += text
        part["logprobs"] = part["logprobs"] + lp
        self._emit(out, self._in_item("response.output_text.delta", idx, content_index=0, delta=text, logprobs=lp))

    def _call_piece(self, out: list[dict[str, Any]], call: ToolCallPiece) -> None:
        k = call.index
        if k not in self.calls:
            self._close(out)
            self.calls[k] = self.open = idx = len(self.items)
            item = {"id": f"{FC_PREFIX}{self.view.sid}_{k}", "type": "function_call", "status": "in_progress",
                    "arguments": "", "call_id": call.id or "", "name": call.name or ""}
            self.items.append(item)
            self._emit(out, {"type": "response.output_item.added", "output_index": idx, "item": dict(item)})
        idx = self.calls[k]
        if self.open != idx:  # a piece of a call already closed: nothing a model writes
            return
        args = call.arguments
        if args:
            self.items[idx]["arguments"] += args
            self._emit(out, self._in_item("response.function_call_arguments.delta", idx, delta=args))

    def _end(self, out: list[dict[str, Any]], e: Event) -> None:
        self.end = e
        status = _final_status(e)
        if not self.opened:  # ended before a worker took it (a cancel while queued): nothing was generated
            self._life(out, "response.created", "queued" if self.view.rec.background else "in_progress")
        if isinstance(e, Error):
            self._emit(out, {"type": "error", "code": e.code, "message": e.message, "param": None})
            self._life(out, "response.failed", status, e)
            return
        self._close(out, status)
        self._life(out, "response.completed" if status == "completed" else "response.incomplete", status, e)

    # -- items --

    def _open_message(self, out: list[dict[str, Any]]) -> None:
        self.open = idx = len(self.items)
        item = {"id": f"{self.view.msg_id}_{idx}" if idx else self.view.msg_id, "type": "message",
                "role": "assistant", "status": "in_progress", "content": []}
        self.items.append({**item, "content": [_part("")]})
        self._emit(out, {"type": "response.output_item.added", "output_index": idx, "item": item})
        self._emit(out, self._in_item("response.content_part.added", idx, content_index=0, part=_part("")))

    def _close(self, out: list[dict[str, Any]], status: str = "completed") -> None:
        """The item being written is whole: its done events."""
        idx = self.open
        if idx is None:
            return
        item = self.items[idx]
        if item["type"] == "message":
            part = item["content"][0]
            self._emit(out, self._in_item("response.output_text.done", idx, content_index=0, text=part["text"],
                                          logprobs=part["logprobs"]))
            self._emit(out, self._in_item("response.content_part.done", idx, content_index=0, part=dict(part)))
        else:
            self._emit(out, self._in_item("response.function_call_arguments.done", idx, name=item["name"],
                                          arguments=item["arguments"]))
        self.items[idx] = done = self._settled(idx, status)
        self._emit(out, {"type": "response.output_item.done", "output_index": idx, "item": done})
        self.open = None

    def _settled(self, index: int, status: str) -> dict[str, Any]:
        item = self.items[index]
        return item if item["status"] != "in_progress" else {**item, "status": _item_status(status)}

    # -- events --

    def _emit(self, out: list[dict[str, Any]], payload: dict[str, Any]) -> None:
        self.sn += 1
        out.append({"type": payload["type"], "sequence_number": self.sn, **payload})

    def _in_item(self, kind: str, index: int, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "item_id": self.items[index]["id"], "output_index": index, **fields}

    def _life(self, out: list[dict[str, Any]], kind: str, status: str, end: Event | None = None) -> None:
        output = [self._settled(i, status) for i in range(len(self.items))] if end is not None else []
        self._emit(out, {"type": kind, "response": response_object(self.view, status, output, end)})


def frame(payload: dict[str, Any]) -> bytes:
    return sse.frame(orjson.dumps(payload), id=payload["sequence_number"], event=payload["type"])


def local_error(sent: int, code: str, message: str) -> bytes:
    """An `error` event this process makes (not in the log): numbered as the last event sent."""
    return frame({"type": "error", "sequence_number": max(sent, 0), "code": code, "message": message,
                  "param": None})
