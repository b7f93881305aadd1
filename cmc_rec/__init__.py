"""Contrastive matrix completion for recommendation (work in progress)."""
