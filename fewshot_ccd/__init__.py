"""Few-shot classification with conditional class dependencies (work in progress)."""
