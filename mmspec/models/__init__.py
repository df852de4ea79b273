"""Model adapters: how tokens become target rows, and how caches roll back."""

from .causal_lm import CausalLM, RollbackError, vocab_size_of

__all__ = ["CausalLM", "RollbackError", "vocab_size_of"]
