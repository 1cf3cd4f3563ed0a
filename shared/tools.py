"""Tool calls: the text form a model writes them in, its grammar, and the parser that reads it back.

A tool call is written as the Hermes format most open tool-calling models
(Qwen, Hermes, and many fine-tunes) were trained on, one block per call:

    <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>

- **The prompt.** Where the model's chat template knows tools (it reads a
  `tools` variable), the template gets them, and the assistant's earlier
  `tool_calls` and the `tool` messages as its own fields. Where it does not
  (SmolLM2's does not), `render` describes the tools in a system message and
  writes earlier calls and tool results as text in the same format.
- **The grammar** (`grammar`): the blocks, with each function's `arguments`
  constrained by its parameters' JSON schema (the same converter as
  `response_format`), so a call always names a tool of the request and its
  arguments always match that tool's schema. `tool_choice: "required"` or a
  named function applies it from the first token; `"auto"` lets the model's
  first token decide (worker/batch.py): an answer that starts with `<` goes
  on under the grammar as calls, any other is text with no grammar at all.
- **The parser** (`CallParser`): the worker reads the text as it is sampled
  and turns it into text pieces and call pieces (a call's id and name once,
  then its arguments as they arrive), which become the stream's token events
  and OpenAI's `delta.tool_calls` chunks. It keeps the raw text of each
  piece, so a takeover continues the exact text under the same grammar.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from tokenfan.shared import jsongrammar, structured

OPEN: Final = "<tool_call>"
CLOSE: Final = "</tool_call>"
# What the grammar fixes between the block's open tag and the arguments: the parser reads it back exactly.
HEAD: Final = '{"name": "'
MIDDLE: Final = '", "arguments": '
TAIL: Final = "}"
SEPARATOR: Final = "\n"
# Tools per request (OpenAI's own cap) and calls per answer (`parallel_tool_calls`: one when false).
MAX_TOOLS: Final = 128
MAX_CALLS: Final = 8
NAME_PATTERN: Final = r"^[A-Za-z0-9_-]{1,64}$"
NO_PARAMETERS: Final[dict[str, Any]] = {"type": "object", "properties": {}}

SYSTEM_PROMPT: Final = (
    "You can call functions. Their signatures, as JSON schemas:\n<tools>\n{tools}\n</tools>\n"
    "To call one, answer with nothing but one block per call:\n"
    '<tool_call>{{"name": <function name>, "arguments": <arguments as a JSON object>}}</tool_call>\n'
    "The result comes back in a <tool_response> block. If no function helps, answer in plain text."
)


def parameters(tool: dict[str, Any]) -> dict[str, Any]:
    params = tool.get("parameters")
    return params if isinstance(params, dict) else dict(NO_PARAMETERS)


def grammar(tools: Sequence[dict[str, Any]], max_calls: int) -> str:
    """The GBNF of one to `max_calls` call blocks of these tools (each {name, description, parameters})."""
    converter: Any = jsongrammar.SchemaConverter  # the vendored converter is untyped
    conv = converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    bodies = []
    for i, tool in enumerate(tools):
        schema = conv.resolve_refs(json.loads(json.dumps(parameters(tool))), f"tool{i}")
        args = conv.visit(schema, f"tool{i}-arguments")
        head = conv._format_literal(HEAD + tool["name"] + MIDDLE)
        bodies.append(conv._add_rule(f"tool{i}-call", f"{head} {args} {conv._format_literal(TAIL)}"))
    block = conv._add_rule("tool-block", f"{conv._format_literal(OPEN)} ({' | '.join(bodies)}) "
                                         f"{conv._format_literal(CLOSE)}")
    more = f" ({conv._format_literal(SEPARATOR)} {block}){{0,{max_calls - 1}}}" if max_calls > 1 else ""
    conv._add_rule("root", block + more)
    return str(conv.format_grammar())


def check(tools: Sequence[dict[str, Any]], limits: structured.Limits = structured.DEFAULT_LIMITS) -> None:
    """Every tool's parameters convert within structured's bounds (SchemaError naming
    `{i}.function.parameters.{part}`), and the grammar of them all fits in its size and rule bounds."""
    for i, tool in enumerate(tools):
        try:
            structured.check(parameters(tool), limits)
        except structured.SchemaError as exc:
            raise structured.SchemaError(f"{i}.function.parameters" + (f".{exc.where}" if exc.where else ""),
                                         str(exc).removeprefix(f"{exc.where}: ")) from None
    try:
        text = grammar(tools, MAX_CALLS)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as exc:
        raise structured.SchemaError("", f"the tools' grammar cannot be built: {exc}") from None
    structured.check_size(text, "the tools' grammar", limits)


def call_id(stream_id: str, index: int, k: int) -> str:
    """The id of call `k` of choice `index`: the same for whichever worker writes it (a takeover)."""
    digest = hashlib.blake2b(f"{stream_id}/{index}/{k}".encode(), digest_size=12).hexdigest()
    return f"call_{digest}"


# --- the prompt ----------------------------------------------------------------

def block(name: str, arguments: str) -> str:
    """One call as the model writes it; `arguments` is the JSON text the call carried."""
    return f"{OPEN}{HEAD}{name}{MIDDLE}{arguments}{TAIL}{CLOSE}"


def template_knows_tools(template: str) -> bool:
    return "tools" in template and "tool_calls" in template


def render(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]],
           knows_tools: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages (and `tools`) a chat template gets. A template that knows tools gets OpenAI's shapes
    as they are; any other gets plain messages: the tools in a system message, calls and results as text."""
    if knows_tools:
        out = []
        for m in messages:
            msg = dict(m)
            if m.get("tool_calls"):
                msg["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
                    "name": c["name"], "arguments": _arguments_value(c["arguments"])}} for c in m["tool_calls"]]
            out.append(msg)
        spec = [{"type": "function", "function": t} for t in tools]
        return out, spec or None
    plain: list[dict[str, Any]] = []
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        system = SYSTEM_PROMPT.format(tools=listing)
        if messages and messages[0]["role"] in ("system", "developer"):
            system = f"{messages[0]['content']}\n\n{system}"
            messages = messages[1:]
        plain.append({"role": "system", "content": system})
    for m in messages:
        if m["role"] == "tool":
            plain.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        elif m.get("tool_calls"):
            calls = SEPARATOR.join(block(c["name"], c["arguments"]) for c in m["tool_calls"])
            plain.append({"role": m["role"], "content": (m["content"] + SEPARATOR if m["content"] else "") + calls})
        else:
            plain.append({"role": m["role"], "content": m["content"]})
    return plain, None


def _arguments_value(arguments: str) -> Any:
    """Templates that know tools expect the arguments as an object (they serialize it themselves)."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


# --- reading it back ------------------------------------------------------------

@dataclass(slots=True)
class Piece:
    """What a run of raw text was: text, or part of call `call` (its name once, when it starts)."""

    raw: str
    text: str = ""
    call: int | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class CallParser:
    """Raw text as it is sampled -> pieces. `auto`: the answer may be text; else it is calls only.

    States: `start` (auto: text or a call? held back until the first characters tell), `text`, and
    inside the calls: `open` (the open tag and HEAD), `name`, `middle` (MIDDLE), `args` (the arguments
    object, followed by its nesting depth), `tail` (TAIL and CLOSE, after the whitespace the converter
    allows), `between` (SEPARATOR and the next block's open tag and HEAD, or the end)."""

    auto: bool
    state: str = "start"
    calls: int = 0  # calls started
    _lit: str = ""  # the literal the state expects, and how much of it was seen
    _seen: int = 0
    _held: str = ""  # raw text not yet classified (start)
    _name: list[str] = field(default_factory=list)
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False

    def __post_init__(self) -> None:
        if not self.auto:
            self._expect("open", OPEN + HEAD)

    def _expect(self, state: str, literal: str) -> None:
        self.state, self._lit, self._seen = state, literal, 0

    def feed(self, raw: str) -> list[Piece]:
        """The pieces this raw text makes (none while it is held back); a piece never spans two calls."""
        if not raw:
            return []
        if self.state == "start":
            return self._start(raw)
        if self.state == "text":
            return [Piece(raw, text=raw)]
        pieces: list[Piece] = []
        run = Piece("", call=self._current())
        for i, c in enumerate(raw):
            before = self.calls
            kind = self._char(c)
            if kind == "text":  # only where no grammar holds the model: text after its calls
                # what looked like the next block's start (a newline, `<tool`) is text after all
                run.raw += raw[i:]
                run.text = self._lit[:self._seen] + raw[i:]
                self.state = "text"
                break
            if self.calls != before:  # a new call starts with this character: the run so far is the last's
                run.raw += c
                pieces.append(run)
                run = Piece("", call=self._current())
                continue
            run.raw += c
            if kind == "named":
                run.name = "".join(self._name)
            elif kind == "arg":
                run.arguments += c
        pieces.append(run)
        return [p for p in pieces if p.raw]

    def _current(self) -> int | None:
        return self.calls - 1 if self.calls else None

    def _start(self, raw: str) -> list[Piece]:
        held = self._held + raw
        if OPEN.startswith(held):
            self._held = held
            return []
        self._held = ""
        if held.startswith(OPEN):
            self._expect("open", OPEN + HEAD)
            return self.feed(held)
        self.state = "text"
        return [Piece(held, text=held)]

    def _char(self, c: str) -> str:
        """One character inside the calls: what it was ("lit", "named", "arg" or "text")."""
        if self.state == "name":
            if c == '"':
                self._expect("middle", MIDDLE[1:])
                return "named"
            self._name.append(c)
            return "lit"
        if self.state == "args":
            return self._arg(c)
        if self.state == "tail" and self._seen == 0 and c in " \t\n":
            return "lit"  # the whitespace the converter allows after the arguments
        if self._seen < len(self._lit) and c == self._lit[self._seen]:
            self._seen += 1
            if self._seen == len(self._lit):
                self._literal_done()
            return "lit"
        return "text" if self.state == "between" else "lit"

    def _literal_done(self) -> None:
        if self.state in ("open", "between"):
            self.calls += 1
            self._name = []
            self.state = "name"
        elif self.state == "middle":
            self.state, self._depth, self._in_string, self._escaped = "args", 0, False, False
        elif self.state == "tail":
            self._expect("between", SEPARATOR + OPEN + HEAD)

    def _arg(self, c: str) -> str:
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif c == "\\":
                self._escaped = True
            elif c == '"':
                self._in_string = False
        elif c == '"':
            self._in_string = True
        elif c in "{[":
            self._depth += 1
        elif c in "}]":
            self._depth -= 1
            if self._depth == 0:
                self._expect("tail", TAIL + CLOSE)
        return "arg"

    def finish(self) -> list[Piece]:
        """The end of the answer: text held back at the start is text after all."""
        if self.state == "start" and self._held:
            held, self._held, self.state = self._held, "", "text"
            return [Piece(held, text=held)]
        return []
