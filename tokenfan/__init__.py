"""tokenfan: stream LLM chat completions token by token to many HTTP clients."""

__version__ = "0.1.0"
