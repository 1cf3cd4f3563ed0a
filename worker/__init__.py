"""The worker: an RQ SimpleWorker that keeps one model loaded and streams events to Redis."""
