"""Domain-specific Large Vision Models: the transformer, its data, training, generation and probes."""
