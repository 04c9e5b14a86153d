"""Images in, training batches out: discovery and decoding, multi-crop views with boxes,
deterministic sampling, and the benchmark builders."""
