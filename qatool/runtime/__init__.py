"""Running models: onnxruntime sessions, engine evaluation batches, latency."""
