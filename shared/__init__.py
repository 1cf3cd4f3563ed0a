"""The bottom layer: settings, key names, events, the Redis event bus, errors.

Imports nothing of `tokenfan.api` or `tokenfan.worker`.
"""
