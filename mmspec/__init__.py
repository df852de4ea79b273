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
