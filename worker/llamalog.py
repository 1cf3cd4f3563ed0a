"""llama.cpp's own log, taken into ours.

llama-cpp-python prints llama.cpp's log to stderr from a callback it
installs at import, with a private switch (`llama_cpp._logger`) for how
much. We install our own callback through the public `llama_log_set`
instead: every line goes to the `llama.cpp` logger at debug level (errors
at warning), and the recent lines are kept, so that a model file llama.cpp
refuses is one line of ours naming the file and llama.cpp's reason, and the
start-up log can say which buffer types the weights went to.

The callback is process-wide in llama.cpp; the engine that installs it
keeps it alive (ctypes would free a callback nobody references).
"""

from __future__ import annotations

import ctypes
import logging
import re
from collections import deque
from typing import Any

log = logging.getLogger("llama.cpp")

# ggml_log_level (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous line).
# llama-cpp-python's own _logger.py still has the older order, with ERROR 3.
GGML_ERROR = 4
GGML_CONT = 5
# Lines kept for the start-up report: a model load writes a few hundred.
KEPT_LINES = 2000
BUFFER_LINE = re.compile(r"\b([A-Za-z0-9_]+) model buffer size =\s*([\d.]+) MiB")


class LlamaLog:
    """llama.cpp's log lines, kept and passed to Python logging."""

    def __init__(self, llama_cpp: Any) -> None:
        self._ll = llama_cpp
        self._callback = llama_cpp.llama_log_callback(self._on_text)
        self.lines: deque[tuple[int, str]] = deque(maxlen=KEPT_LINES)
        self._partial = ""
        self._level = 0
        # While a model loads, its errors are said once, in the engine's own line that names the file.
        self.quiet = False

    def install(self) -> None:
        self._ll.llama_log_set(self._callback, ctypes.c_void_p(0))

    def _on_text(self, level: int, text: bytes | None, user_data: object) -> None:
        if level != GGML_CONT:
            self._level = level
        self._partial += (text or b"").decode("utf-8", "replace")
        while "\n" in self._partial:
            line, self._partial = self._partial.split("\n", 1)
            self.lines.append((self._level, line))
            loud = self._level == GGML_ERROR and not self.quiet
            log.log(logging.WARNING if loud else logging.DEBUG, "%s", line)

    def errors(self) -> list[str]:
        return [line.strip() for level, line in self.lines if level == GGML_ERROR and line.strip()]

    def buffers(self) -> dict[str, float]:
        """MiB of weights per buffer type of the last model load (CPU_Mapped, CPU_REPACK, AMX, CUDA0 …)."""
        found: dict[str, float] = {}
        for _, line in self.lines:
            m = BUFFER_LINE.search(line)
            if m:
                found[m.group(1)] = float(m.group(2))
        return found

    def clear(self) -> None:
        self.lines.clear()
