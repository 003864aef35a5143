"""Training and evaluation data: released dataset layouts (datasets) and synthetic pairs (synth)."""
