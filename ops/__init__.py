"""The operator's tools: the `tokenfan` command and what it starts."""
