"""Acceptance criteria behind one small protocol, constructible by name.

>>> from mmspec import acceptance
>>> acceptance.available()
['exact', 'typical']
>>> crit = acceptance.get("exact"); crit.lossless
True
"""

from .base import Criterion, available, gather_token_probs, get, register
from .continuous import ContinuousCriterion, verify_continuous  # continuous tokens: not in the token registry
from .exact import Exact
from .gsd import GSD
from .lantern import Lantern, deviation, modified_target
from .typical import Typical

__all__ = [
    "ContinuousCriterion", "Criterion", "Exact", "GSD", "Lantern", "Typical", "available", "deviation",
    "gather_token_probs", "get", "modified_target", "register", "verify_continuous",
]
