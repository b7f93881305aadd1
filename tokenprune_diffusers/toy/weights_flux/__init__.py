"""Trained Flux-shaped toy weights (safetensors + config.json); a package so that they install with it."""
