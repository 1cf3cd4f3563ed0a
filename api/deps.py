"""What every route takes: this process's Edge, and who calls."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from tokenfan.api.auth import Principal
from tokenfan.api.edge import Edge


def edge_of(request: Request) -> Edge:
    edge: Edge = request.app.state.edge
    return edge


async def caller(request: Request) -> Principal:
    """Every protected route's dependency: who calls, or 401/403."""
    return await edge_of(request).auth.principal(request)


Caller = Annotated[Principal, Depends(caller)]
