"""Proposers: who drafts the tokens the target verifies."""

from .base import NoDraft, Proposer
from .jacobi import INIT_STRATEGIES, JacobiProposer, register_init
from .layer_skip import calibrate_skip, layer_skip_model
from .lookahead import LookaheadProposer
from .lookup import LookupProposer
from .model import DraftModelProposer

__all__ = ["DraftModelProposer", "INIT_STRATEGIES", "JacobiProposer", "LookaheadProposer", "LookupProposer", "NoDraft",
           "Proposer", "calibrate_skip", "layer_skip_model", "register_init"]
