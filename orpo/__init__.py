"""ORPO (Hong et al. 2024) with a hand-written loss and collator on a raw Accelerate loop."""
