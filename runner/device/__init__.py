"""The device side: the runner's one record, the jitted programs that read it, and the
lifecycle operations that build the next record (weights, sharding, warm-up)."""
