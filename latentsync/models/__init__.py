"""Network definitions whose state-dict keys match the upstream checkpoints."""
