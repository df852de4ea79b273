"""mmspec: lossless speculative decoding for text, vision-language, image and video autoregressive models.

Public entry points:

* ``mmspec.generate(model, input_ids, max_new_tokens=..., method="jacobi"|"draft"|"lookup"|"ar", ...)``
* ``mmspec.verify(draft_tokens, draft_probs, target_probs, criterion, generator)``: the verification core
* ``mmspec.acceptance.get(name, **params)``: acceptance criteria
"""

from . import acceptance
from .decoding import GenerationStats
from .generation import GenerateOutput, generate
from .sampling import LogitsPipeline
from .verify import VerifyResult, verify

__version__ = "0.1.0"

_LAZY = ("pipelines", "models", "drafting", "kernels", "zoo", "bench")


def __getattr__(name):  # heavy submodules (diffusers, triton, training data) load on first use
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "acceptance",
    "generate",
    "GenerateOutput",
    "GenerationStats",
    "LogitsPipeline",
    "verify",
    "VerifyResult",
    "__version__",
]
