"""Proposers: who drafts the tokens the target verifies, and the registry of decoding methods built from them.

Built-in methods (``available_methods()``): ``"jacobi"`` (the target drafts for itself), ``"draft"`` (a draft model
proposes), ``"lookup"`` (n-gram match in the context) and ``"ar"`` (plain decoding through the same loop); for
continuous tokens ``"draft"`` and ``"ar"``. A new method is a ``Proposer`` subclass and a factory registered with
``register_method``.
"""

from .base import MethodSpec, NoDraft, Proposer, available_methods, make_proposer, method_spec, register_method
from .continuous import ContinuousDraftProposer, GaussianDrafts
from .hybrid import JacobiDraftProposer
from .jacobi import INIT_STRATEGIES, JacobiProposer, register_init
from .layer_skip import calibrate_skip, layer_skip_model
from .lookahead import DEFAULT_LOOKAHEAD, LookaheadProposer, lookahead_config
from .lookup import LookupProposer
from .model import DraftModelProposer

__all__ = ["ContinuousDraftProposer", "DraftModelProposer", "GaussianDrafts", "INIT_STRATEGIES", "JacobiDraftProposer",
           "JacobiProposer",
           "LookaheadProposer", "LookupProposer", "MethodSpec", "NoDraft", "Proposer", "TREE_METHODS", "available_methods",
           "calibrate_skip", "layer_skip_model", "make_proposer", "method_spec", "register_init", "register_method"]


@register_method("jacobi", default_window=16)
def _jacobi(window, init="random", coupled=False, layout=None, tree=None):
    return JacobiProposer(window, init=init, coupled=coupled, layout=layout, tree=tree)


@register_method("draft", default_window=6, needs_draft=True)
def _draft(window, draft, adaptive=False, draft_confidence=None, prefill_kwargs=None, tree=None):
    start = min(5, window - 1) if adaptive else window - 1
    return DraftModelProposer(draft, max(start, 1) if window > 1 else 0, adaptive=adaptive, max_drafts=window - 1,
                              confidence=draft_confidence, prefill_kwargs=prefill_kwargs, tree=tree)


#: methods whose drafts can branch (``tree=(width, depth)``)
TREE_METHODS = ("jacobi", "draft", "lookup", "jacobi-draft", "lookahead", "self")

#: draft tokens of the draft model's branch in method "jacobi-draft" (its chain stops earlier with
#: ``draft_confidence``), and its width: above 1, the branch is the draft's tree ``(width, depth)`` of
#: ``depth + width - 1`` nodes (its chain and the ``width - 1`` best other nodes, ``mmspec.drafting.draft_tree``)
JACOBI_DRAFT_DEPTH = 4
JACOBI_DRAFT_WIDTH = 1


@register_method("jacobi-draft", default_window=24, needs_draft=True)
def _jacobi_draft(window, draft, init="random", coupled=False, layout=None, tree=None, draft_confidence=None,
                  prefill_kwargs=None):
    """Jacobi (chain or tree) plus the draft model's chain as a sibling branch under the anchor, one forward."""
    depth = min(JACOBI_DRAFT_DEPTH, (window - 1) // 2)
    if depth < 1:
        raise ValueError(f"method='jacobi-draft' needs window >= 3 (Jacobi drafts and a draft branch), got {window}.")
    width = JACOBI_DRAFT_WIDTH
    nodes = depth + width - 1
    if width > 1 and draft_confidence is not None:
        raise ValueError("method='jacobi-draft' with a draft tree (JACOBI_DRAFT_WIDTH > 1) takes no `draft_confidence`.")
    jacobi = JacobiProposer(window - nodes, init=init, coupled=coupled, layout=layout, tree=tree)
    return JacobiDraftProposer(jacobi, DraftModelProposer(draft, nodes, confidence=draft_confidence,
                                                          prefill_kwargs=prefill_kwargs,
                                                          tree=(width, depth) if width > 1 else None))


@register_method("lookup", default_window=11)
def _lookup(window, max_ngram=3, tree=None, lookup_match="longest"):
    return LookupProposer(window - 1, max_ngram=max_ngram, tree=tree, match=lookup_match)


@register_method("self", default_window=6)
def _self(window, model=None, prompt=None, skip=None, adaptive=False, draft_confidence=None, prefill_kwargs=None,
          greedy=True, make_adapter=None, tree=None):
    """The target minus some decoder layers drafts for itself (``skip=None``: calibrated on the prompts), as a chain
    or, with ``tree=(width, depth)``, as an EAGLE-2-style draft tree."""
    from .layer_skip import self_draft_proposer

    return self_draft_proposer(model, *prompt, skip=skip, window=window, adaptive=adaptive, confidence=draft_confidence,
                               prefill_kwargs=prefill_kwargs, greedy=greedy, make_adapter=make_adapter, tree=tree)


@register_method("lookahead", default_window=DEFAULT_LOOKAHEAD[0] + 1)
def _lookahead(window, lookahead=None, tree=None):
    """Lookahead decoding: Jacobi trajectories fill an n-gram pool whose matches are verified (several as sibling
    branches with ``tree=(width, depth)``)."""
    config, _ = lookahead_config(lookahead, window)
    return LookaheadProposer(*config, tree=tree)


@register_method("ar", default_window=1, fixed_window=1)
@register_method("ar", default_window=1, fixed_window=1, kind="continuous")
def _ar(window):
    return NoDraft()


@register_method("draft", default_window=4, needs_draft=True, kind="continuous")
def _continuous_draft(window, draft, draft_trajectory, align=True):
    return ContinuousDraftProposer(draft, draft_trajectory, window - 1, align=align)
