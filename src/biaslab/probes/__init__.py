"""Bias probes that need training first: the soft-prompt sentiment fairness probe (METHODS.md §3)."""
