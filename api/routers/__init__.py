"""One APIRouter per surface, included by api/app.py's `create_app` in this order.

- `openai`: OpenAI's chat completions, legacy completions and models;
- `native`: tokenfan's own streams (start, follow and resume, cancel);
- `ops`: probes, metrics and their targets, the chat and ops pages;
- `responses`: OpenAI's Responses API.

Every streaming route relays through api/relay.py; every error leaves as api/errors.py builds it.
"""

from __future__ import annotations

from tokenfan.api.routers import native, openai, ops, responses

ROUTERS = (openai.router, native.router, ops.router, responses.router)
