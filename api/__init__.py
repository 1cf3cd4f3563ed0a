"""The HTTP edge: routes, SSE relay, resume, the ops page."""
