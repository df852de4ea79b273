"""The proposer protocol (what the decoding loop asks of a drafter) and the registry of decoding methods.

A method name (``"jacobi"``, ``"draft"``, ``"lookup"``, ``"ar"``, ...) maps to a factory that builds its proposer;
``mmspec.generate``, the pipelines and the CLI all choose proposers here, so the list of methods is the registry's
(``available_methods()``). A method may have one factory per kind of token (``"tokens"``, ``"continuous"``).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["MethodSpec", "NoDraft", "Proposer", "available_methods", "make_proposer", "method_spec",
           "pad_drafts", "register_method", "row_limits"]


def row_limits(state, max_tokens: int) -> torch.Tensor:
    """LongTensor [B] (CPU): the drafts each row may propose this step, from its own progress only.

    ``max_tokens`` is the loop's batch-wide cap (it follows the row with the most tokens left); a row's own cap
    is ``remaining - 1``. Proposing up to ``min(max_tokens, remaining[b] - 1)`` drafts in row ``b`` gives it the
    window it would have alone, so a row decodes the same tokens alone as in any batch (0 for finished rows).
    """
    return (state.remaining - 1).clamp_(0, max(max_tokens, 0))


def pad_drafts(drafts: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """[B, K] drafts -> the same with -1 from ``limit[b]`` on (the slots row ``b`` does not propose)."""
    own = torch.arange(drafts.shape[1], device=drafts.device) < limit.to(drafts.device).unsqueeze(1)
    return torch.where(own, drafts, -1)


class Proposer(ABC):
    """Proposes draft tokens for every row before each target forward.

    The loop calls ``start`` once after the target's prefill, then per step ``propose`` -> (target forward,
    verify, commit) -> ``update``. Proposers read the committed tokens from ``state`` (a ``mmspec.decoding.State``:
    ``DecodeState`` for ids, ``mmspec.continuous.ContinuousState`` for vectors) and never touch the target's cache.
    """

    #: number of forwards this proposer ran on a separate draft model
    draft_forwards: int = 0

    def start(self, state) -> None:  # noqa: B027 -- an optional hook, empty by default
        """Called once, after the target prefill and the first committed token."""

    @abstractmethod
    def propose(self, state, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return drafts [B, K] (K <= max_tokens, on ``state.device``) and the rows [B, K, V] they were
        drawn from, or None when every draft is deterministic (one-hot ``q``). Continuous proposers return
        drafts [B, K, C] and a ``GaussianDrafts``; token proposers may return a ``mmspec.tree.DraftTree`` instead
        of the pair (several candidates per position).

        Per-row reproducibility: a row proposes what it would alone (at most ``row_limits(state, max_tokens)``
        drafts, a number that depends on that row only) and fills the rest of the batch's window with -1
        (``pad_drafts``); every random draw over the window passes those per-row counts (``mmspec.sampling``)."""

    def update(self, state, result, target_rows: torch.Tensor, num_accepted: torch.Tensor) -> None:  # noqa: B027
        """After verification: ``result`` is the ``VerifyResult``, ``target_rows`` [B, K+1, V] the target's
        probabilities (processed scores when greedy), ``num_accepted`` the CPU copy of the accepted counts."""


class NoDraft(Proposer):
    """Plain autoregressive decoding through the same loop: an empty window every step."""

    def propose(self, state, max_tokens):
        return state.no_drafts(), None


@dataclass(frozen=True)
class MethodSpec:
    """A registered decoding method.

    Attributes:
        name: what users pass as ``method=``.
        factory: ``factory(window, **options) -> Proposer``; it declares the options it uses as parameters.
        default_window: tokens verified per target forward when the user gives none.
        kind: ``"tokens"`` or ``"continuous"``.
        needs_draft: the method proposes with a draft model (``draft=`` is a required factory option).
        fixed_window: a window the method always uses (1 for plain AR), whatever the user asks.
    """

    name: str
    factory: Callable[..., Proposer]
    default_window: int
    kind: str = "tokens"
    needs_draft: bool = False
    fixed_window: int | None = None


_METHODS: dict[tuple[str, str], MethodSpec] = {}


def register_method(name: str, *, default_window: int, kind: str = "tokens", needs_draft: bool = False,
                    fixed_window: int | None = None):
    """Decorator: register ``factory(window, **options) -> Proposer`` as decoding method ``name`` for ``kind``.

    Example (``RepeatLastProposer`` being a ``Proposer`` subclass)::

        @register_method("repeat-last", default_window=4)
        def _repeat_last(window):
            return RepeatLastProposer(num_drafts=window - 1)
    """

    def wrap(factory):
        _METHODS[(name, kind)] = MethodSpec(name, factory, default_window, kind, needs_draft, fixed_window)
        return factory

    return wrap


def available_methods(kind: str = "tokens") -> list[str]:
    """Names of the decoding methods registered for ``kind`` (``"tokens"`` or ``"continuous"``), in registration
    order."""
    return [name for (name, k) in _METHODS if k == kind]


def method_spec(name: str, kind: str = "tokens", arg: str = "method") -> MethodSpec:
    """The ``MethodSpec`` of ``name``; a ``ValueError`` naming ``arg`` and the choices for an unknown one."""
    spec = _METHODS.get((name, kind)) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown `{arg}` {name!r}; choose one of {available_methods(kind)}.")
    return spec


def make_proposer(name: str, window: int | None = None, *, kind: str = "tokens", **options) -> tuple[Proposer, int]:
    """Build the proposer of method ``name``: returns ``(proposer, window)``, the window being the user's, the
    method's default when None, or the method's fixed window. ``options`` may hold every method's settings (as
    ``mmspec.generate`` passes them): each factory receives the ones it declares."""
    spec = method_spec(name, kind)
    window = spec.fixed_window or (spec.default_window if window is None else window)
    params = inspect.signature(spec.factory).parameters
    return spec.factory(window, **{k: v for k, v in options.items() if k in params}), window
