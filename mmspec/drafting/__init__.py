"""Proposers: who drafts the tokens the target verifies."""

from .base import NoDraft, Proposer
from .jacobi import INIT_STRATEGIES, JacobiProposer, register_init
from .lookup import LookupProposer
from .model import DraftModelProposer

__all__ = ["DraftModelProposer", "INIT_STRATEGIES", "JacobiProposer", "LookupProposer", "NoDraft", "Proposer",
           "register_init"]
