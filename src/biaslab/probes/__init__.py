"""Bias probes that need training first: the soft-prompt sentiment fairness probe (docs/methods/softprompt.md)."""
