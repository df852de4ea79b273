"""Model adapters: how tokens become target rows, and how caches roll back.

What anyone adding a model needs: ``TargetAdapter`` (the contract the decoding loop relies on), ``CausalLM``
(transformers causal LMs), ``GuidedLM`` (image-token models: guidance and structural forcing), ``ImageFamily`` and
``register_family`` (prompt format, image layout and decoding of a new image-model family).
"""

from .adapter import TargetAdapter
from .causal_lm import CausalLM, RollbackError, vocab_size_of
from .families import ImageFamily, register_family
from .image_tokens import GuidedLM, ImageLayout, VideoLayout

__all__ = ["CausalLM", "GuidedLM", "ImageFamily", "ImageLayout", "RollbackError", "TargetAdapter", "VideoLayout",
           "register_family", "vocab_size_of"]
