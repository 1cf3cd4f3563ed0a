"""`tokenfan bench`: scenarios, load clients and reports. Never shipped in an image."""
