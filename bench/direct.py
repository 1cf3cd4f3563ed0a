"""Scenario 4's reference: llama-cpp-python called directly, in one process of its own.

Loads the model once (same file, context and threads as the tokenfan
worker), then answers each `run` line on stdin with one streamed chat
completion, timed the way the bench's client times tokenfan: the first and
the last non-empty content piece, on `time.time()`.
"""

from __future__ import annotations

import sys
import time
import zlib
from typing import Any

import orjson

from tokenfan.bench.client import emit


def load(job: dict[str, Any]) -> Any:
    from llama_cpp import Llama

    threads = int(job["threads"])
    # flash_attn: the worker's batch engine runs llama.cpp's default ("auto": on for this CPU), as
    # llama-server does; llama-cpp-python's Llama turns it off. Same kernels, so the same greedy text.
    return Llama(model_path=job["model_path"], n_ctx=int(job["n_ctx"]), n_threads=threads,
                 n_threads_batch=threads, flash_attn=True, verbose=False)


def one(llm: Any, job: dict[str, Any]) -> dict[str, Any]:
    t_send = time.time()
    t_first = t_last = 0.0
    pieces: list[str] = []
    finish = ""
    for chunk in llm.create_chat_completion(messages=job["messages"], max_tokens=int(job["max_tokens"]),
                                            temperature=float(job["temperature"]), stream=True):
        choice = chunk["choices"][0]
        content = choice["delta"].get("content")
        if content:
            t_last = time.time()
            t_first = t_first or t_last
            pieces.append(content)
        finish = choice.get("finish_reason") or finish
    return {"t_send": t_send, "t_first": t_first, "t_last": t_last, "t_end": time.time(), "tokens": len(pieces),
            "finish": finish, "text_crc": zlib.crc32("".join(pieces).encode()), "status": 200, "error": ""}


def main() -> int:
    job = orjson.loads(sys.stdin.readline())
    llm = load(job)
    emit({"event": "ready"})
    for line in sys.stdin:
        if line.strip() != "run":
            break
        emit({"event": "result", **one(llm, job)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
