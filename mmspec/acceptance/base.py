"""The acceptance-criterion protocol and its name registry.

A criterion answers two questions for the verification core (``mmspec.verify``), vectorised over the
batch and the window:

* ``acceptance(draft_tokens, draft_probs, target_probs)``: the probability ``a_i`` in [0, 1] with which
  draft ``x_i`` is accepted, given the row ``q_i`` it was drawn from (None: a deterministic draft, one-hot
  ``q``) and the target row ``p_i``. The core draws ``u ~ U(0, 1]`` and accepts iff ``u <= a_i``.
* ``residual(draft_tokens, draft_probs, target_probs)``: non-negative, unnormalised weights [B, V] of the
  distribution to emit from at the first rejection. The core falls back to ``p`` where a residual row has
  no mass, so a criterion never has to guard against ``p == q``.

Exact speculative sampling is the pair ``min(1, p(x)/q(x))`` and ``max(p - q, 0)``; relaxed criteria
change one or both and declare ``lossless = False``.

Criteria of ``kind = "continuous"`` (``mmspec.acceptance.continuous``) answer the same two questions for continuous
tokens, whose rows are Gaussian densities (means and scales) instead of probability vectors; a decode uses only
criteria of its state's kind (``get(..., kind=...)`` checks it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

__all__ = ["Criterion", "register", "get", "available", "gather_token_probs"]


def gather_token_probs(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """probs [..., V], tokens [...] -> probs[..., tokens] with the shape of ``tokens``."""
    return probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class Criterion(ABC):
    """Base class for acceptance criteria.

    Attributes:
        name: the registry name.
        lossless: True when the output distribution equals the target's exactly.
        requires_sampling: True when the criterion is meaningless for greedy decoding
            (``do_sample=False`` then raises).
        kind: ``"tokens"`` (rows are probability vectors over a vocabulary) or ``"continuous"`` (rows are Gaussian
            densities of continuous tokens).
    """

    name: str = "criterion"
    lossless: bool = False
    requires_sampling: bool = False
    kind: str = "tokens"

    @abstractmethod
    def acceptance(self, draft_tokens, draft_probs, target_probs) -> torch.Tensor:
        """[B, K] ids, [B, K, V] or None, [B, K, V] -> [B, K] acceptance probabilities in [0, 1]."""

    @abstractmethod
    def residual(self, draft_tokens, draft_probs, target_probs) -> torch.Tensor:
        """[B] ids, [B, V] or None, [B, V] -> [B, V] unnormalised weights to emit from on rejection."""

    def greedy_accept(self, draft_tokens, scores) -> torch.Tensor:
        """Greedy decoding: [B, K] drafts, [B, K, V] processed scores -> BoolTensor [B, K], whether each draft
        passes at its position (the core keeps the accepted prefix and emits the argmax after it). The default
        is exact greedy verification: the draft is the argmax (first index on ties)."""
        return draft_tokens == scores.argmax(-1)

    def prepare(self, **context) -> Criterion:
        """Hook for criteria that precompute tables from the model (codebooks, embeddings). No-op here."""
        return self

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


_REGISTRY: dict[str, Callable[..., Criterion]] = {}
_KINDS = {"tokens": "token ids", "continuous": "continuous tokens"}


def register(name: str):
    """Class decorator: make a criterion constructible as ``mmspec.acceptance.get(name, **params)``."""

    def wrap(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available(kind: str | None = None) -> list[str]:
    """Names of the registered criteria (of one ``kind``, ``"tokens"`` or ``"continuous"``, when given)."""
    return sorted(name for name, cls in _REGISTRY.items() if kind is None or cls.kind == kind)


def get(criterion="exact", *, kind: str | None = None, **params) -> Criterion:
    """A criterion from its registry name (or pass a criterion object through unchanged).

    ``kind`` (``"tokens"`` or ``"continuous"``), when given, is the kind of tokens being decoded: a criterion of
    another kind raises a ``ValueError`` naming the criteria that fit.

    >>> get("typical", epsilon=0.09, alpha=0.3).name
    'typical'
    """
    if isinstance(criterion, Criterion):
        if params:
            raise ValueError("parameters can only be given together with a criterion name, not an object.")
        crit = criterion
    elif not isinstance(criterion, str) or criterion not in _REGISTRY:
        raise ValueError(f"unknown acceptance criterion {criterion!r}; available: {available(kind)}.")
    else:
        try:
            crit = _REGISTRY[criterion](**params)
        except TypeError as err:
            raise ValueError(f"bad parameters for acceptance criterion {criterion!r}: {err}") from None
    if kind is not None and crit.kind != kind:
        raise ValueError(f"acceptance={crit.name!r} verifies {_KINDS.get(crit.kind, crit.kind)}, but this decode "
                         f"makes {_KINDS.get(kind, kind)}; choose one of {available(kind)}.")
    return crit
