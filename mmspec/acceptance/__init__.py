"""Acceptance criteria behind one small protocol, constructible by name.

>>> from mmspec import acceptance
>>> acceptance.available()
['exact', 'typical']
>>> crit = acceptance.get("exact"); crit.lossless
True
"""

from .base import Criterion, available, gather_token_probs, get, register
from .exact import Exact
from .typical import Typical

__all__ = ["Criterion", "Exact", "Typical", "available", "gather_token_probs", "get", "register"]
