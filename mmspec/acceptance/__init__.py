"""Acceptance criteria behind one small protocol, constructible by name.

>>> from mmspec import acceptance
>>> {"exact", "typical", "lantern", "gsd", "continuous"} <= set(acceptance.available())  # and any registered later
True
>>> "continuous" in acceptance.available("tokens")
False
>>> crit = acceptance.get("exact"); crit.lossless
True
>>> acceptance.get("lantern", k=4, delta=0.1).lossless  # relaxed criteria say they are lossy
False
>>> acceptance.get("continuous").lossless
True
"""

from .base import Criterion, available, gather_token_probs, get, register
from .continuous import ContinuousCriterion, verify_continuous
from .exact import Exact
from .gsd import GSD
from .lantern import Lantern, deviation, modified_target
from .typical import Typical

__all__ = [
    "ContinuousCriterion", "Criterion", "Exact", "GSD", "Lantern", "Typical", "available", "deviation",
    "gather_token_probs", "get", "modified_target", "register", "verify_continuous",
]
