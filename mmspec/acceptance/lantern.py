"""LANTERN / LANTERN++ relaxed acceptance (Jang et al. 2024): latent-neighbour mass moved onto the draft.

Lossy and opt-in. For a draft ``x`` whose neighbours (nearest VQ-codebook entries, nearest first) are
``n_1..n_k``::

    c_j    = p(n_1) + ... + p(n_j)
    J      = max{ j : c_j <= bound }       bound = delta (LANTERN) or (lam - 1) p(x) (LANTERN++)
    p~     = p with p(n_1..n_J) moved onto x          (p~(x) = p(x) + c_J)
    accept with min(1, p~(x) / q(x)); on rejection emit from max(p~ - q, 0)

Exactly the J-prefix is moved (never J + 1), so with a deterministic (one-hot) draft the emitted token is
distributed as ``p~`` and ``TV(p~, p) = c_J <= bound``. With drafts *sampled* from ``q`` there is no such
bound: ``p~`` depends on the sampled ``x``, and the output is not ``p~`` of anything (see
``tests/test_relaxed_criteria.py`` for an example with TV twice ``delta``). Measure the deviation with
``modified_target`` / ``deviation`` (deterministic drafts) or empirically; never report ``delta`` as the
deviation.

Greedy LANTERN (``do_sample=False``, as the reference code's greedy mode): the draft ``x`` passes when it is
the argmax of ``p`` with ``p(x)`` raised to ``p~(x)`` (``p`` the softmax of the processed scores, temperature
not applied); the emitted token after the accepted prefix is the plain argmax of ``p``. ``delta = 0`` /
``lam = 1`` is exact greedy decoding.

Parameters differ from the reference code's: there one ``lantern_delta`` means LANTERN's delta when it is at
most 1 and LANTERN++'s lambda above 1. Here the two are separate arguments, and ``delta >= 1`` (which would
accept every draft) is rejected with a pointer to ``lam=``.
"""

from __future__ import annotations

import math

import torch

from .base import Criterion, gather_token_probs, get, register
from .neighbours import DEFAULT_CHUNK_ELEMENTS, as_matrix, image_neighbours, rows_for_tokens

__all__ = ["Lantern", "modified_target", "deviation"]


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return value


def _check_float(name, value, minimum, allow_inf=True):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a number >= {minimum}, got {value!r}.") from None
    if math.isnan(v) or v < minimum or (not allow_inf and math.isinf(v)):
        raise ValueError(f"`{name}` must be a {'finite ' if not allow_inf else ''}number >= {minimum}, got {value!r}.")
    return v


@register("lantern")
class Lantern(Criterion):
    """LANTERN (additive ``delta``) or LANTERN++ (multiplicative ``lam``) relaxed acceptance.

    Args:
        k: neighbours per image token; a given ``neighbours`` table is cut to ``k`` columns. Default: 1000 with
            ``delta`` (the LANTERN paper), 10 with ``lam`` (the reference code runs LANTERN++ with k of 5-10:
            the multiplicative bound moves little mass, so far neighbours rarely count, and a short table is
            cheaper).
        delta: additive bound on the moved mass, in ``[0, 1)`` (default 0.1 when ``lam`` is not given).
            ``delta = 0`` is exactly ``exact``. The reference code's ``lantern_delta`` above 1 is LANTERN++'s
            lambda: pass it as ``lam=``.
        lam: LANTERN++ multiplicative bound ``(lam - 1) * p(x)``, ``>= 1``; give either ``delta`` or ``lam``.
            ``lam = 1`` is exactly ``exact``.
        codebook: ``[N, D]`` VQ codebook (tensor or ``nn.Embedding``); row ``i`` is token
            ``image_token_offset + i``. The neighbour table is built from it once (chunked, see
            ``mmspec.acceptance.neighbours``).
        image_token_offset: id of the first image token in a joint text+image vocabulary.
        vocab_size: the target's vocabulary size (checked against the table; optional).
        neighbours: a precomputed LongTensor table instead of ``codebook``: row ``i`` lists the neighbour
            token ids of token ``image_token_offset + i``, nearest first, ``-1`` for none, self excluded.
            A full ``[V, k]`` table (e.g. ``codebook_neighbours(...)``) goes with ``image_token_offset=0``.
        max_chunk_elements: memory bound (distances per block) for building the table.

    Without a codebook or table the criterion can be constructed (e.g. by name) and gets its table from
    ``prepare(codebook=..., image_token_offset=..., vocab_size=...)``; using it before raises RuntimeError.
    Text (non-image) tokens have no neighbours, so they are verified exactly.
    """

    lossless = False
    requires_sampling = False  # greedy LANTERN is defined (see the module docstring)

    def __init__(
        self,
        k: int | None = None,
        delta: float | None = None,
        lam: float | None = None,
        codebook=None,
        image_token_offset: int = 0,
        vocab_size: int | None = None,
        neighbours=None,
        *,
        max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ):
        if lam is not None and delta is not None:
            raise ValueError("give either `delta` (additive LANTERN) or `lam` (multiplicative LANTERN++), not both.")
        if lam is not None:
            self.lam = _check_float("lam", lam, 1.0, allow_inf=False)
            self.delta = None
        else:
            self.delta = _check_float("delta", 0.1 if delta is None else delta, 0.0)
            if self.delta >= 1.0:
                raise ValueError(
                    f"`delta` must be in [0, 1) (a total-variation budget; delta >= 1 accepts every draft), got "
                    f"{delta!r}. For LANTERN++ (the reference code's lantern_delta above 1) pass `lam={delta!r}` "
                    "instead.")
            self.lam = None
        self.k = _check_int("k", (10 if lam is not None else 1000) if k is None else k, 1)
        self.image_token_offset = _check_int("image_token_offset", image_token_offset, 0)
        self.vocab_size = None if vocab_size is None else _check_int("vocab_size", vocab_size, 1)
        self._max_chunk_elements = _check_int("max_chunk_elements", max_chunk_elements, 1)
        self._table = None  # LongTensor [rows, width] of token ids; row i <-> token _row_offset + i
        self._row_offset = 0
        self._max_id = -1
        self._source = None
        self._on_device = {}
        if neighbours is not None:
            self._set_table(neighbours, self.image_token_offset, source=("user",))
        elif codebook is not None:
            self._build(codebook, self.image_token_offset)

    # -- table management (once, never per call) ---------------------------------------------------
    def prepare(self, codebook=None, image_token_offset=None, vocab_size=None, neighbours=None, **context):
        """Build the neighbour table from the model's VQ codebook (skipped when it is already built from
        the same codebook, or when a table was given explicitly). Other context keys are ignored."""
        if image_token_offset is not None:
            self.image_token_offset = _check_int("image_token_offset", image_token_offset, 0)
        if vocab_size is not None:
            self.vocab_size = _check_int("vocab_size", vocab_size, 1)
        if neighbours is not None:
            self._set_table(neighbours, self.image_token_offset, source=("user",))
        elif codebook is not None and (self._source is None or self._source[0] != "user"):
            cb = as_matrix(codebook)
            key = self._codebook_key(cb, self.image_token_offset)
            if key != self._source:
                self._build(cb, self.image_token_offset, key)
        self._check_vocab(self.vocab_size)
        return self

    def _build(self, codebook, offset, key=None):
        cb = as_matrix(codebook)
        table = image_neighbours(cb, self.k, offset, max_chunk_elements=self._max_chunk_elements)
        self._set_table(table, offset, source=key or self._codebook_key(cb, offset), trusted=True)

    def _codebook_key(self, cb, offset):
        # storage, shape and in-place version: the same weights prepared twice are not rebuilt
        return ("codebook", cb.device, cb.data_ptr(), cb._version, tuple(cb.shape), tuple(cb.stride()), offset, self.k)

    def _set_table(self, table, offset, source, trusted=False):
        table = torch.as_tensor(table)
        if table.dim() != 2 or table.is_floating_point() or table.dtype == torch.bool:
            raise ValueError(
                f"`neighbours` must be a 2-D integer table [rows, k], got {table.dtype} {tuple(table.shape)}."
            )
        table = table[:, : self.k].to(torch.long).contiguous()
        if not trusted and table.numel():  # one-off validation (host syncs are fine here, never per call)
            if bool((table < -1).any()):
                raise ValueError("`neighbours` entries must be token ids or -1 (no neighbour).")
            own = torch.arange(table.shape[0], device=table.device).unsqueeze(1) + offset
            if bool((table == own).any()):
                raise ValueError("`neighbours` must exclude each token itself.")
        self._table = table
        self._row_offset = int(offset)
        self._max_id = int(table.max()) if table.numel() else -1
        self._source = source
        self._on_device = {table.device: table}
        self._check_vocab(self.vocab_size)

    def _check_vocab(self, V):
        if V is not None and self._table is not None and self._max_id >= V:
            raise ValueError(f"the neighbour table refers to token {self._max_id} but the vocabulary has {V} tokens.")

    def _table_on(self, device, V):
        if self._table is None:
            raise RuntimeError(
                "Lantern has no neighbour table yet: pass `codebook=` or `neighbours=` to the constructor, "
                "or call `prepare(codebook=..., image_token_offset=...)` before verifying."
            )
        self._check_vocab(V)
        table = self._on_device.get(device)
        if table is None:
            table = self._on_device[device] = self._table.to(device)
        return table

    # -- the math --------------------------------------------------------------------------------------
    def _terms(self, draft_tokens, target_probs):
        """x [...], p [..., V] -> (p~(x) [...], neighbour ids [..., w], moved mask [..., w], c_J [...])."""
        p = target_probs
        table = self._table_on(p.device, p.shape[-1])
        rows, inside = rows_for_tokens(draft_tokens, self._row_offset, table.shape[0])
        nbr = table[rows]  # [..., w]
        valid = (nbr >= 0) & inside.unsqueeze(-1)
        p_x = gather_token_probs(p, draft_tokens)
        if nbr.shape[-1] == 0:
            return p_x, nbr, valid, torch.zeros_like(p_x)
        p_n = torch.where(valid, p.gather(-1, nbr.clamp_min(0)), torch.zeros((), dtype=p.dtype, device=p.device))
        c = p_n.cumsum(-1)
        bound = (self.lam - 1.0) * p_x if self.lam is not None else torch.full_like(p_x, self.delta)
        # A prefix by construction (cumprod), even if a parallel cumsum rounds non-monotonically.
        within = (c <= bound.unsqueeze(-1)).long().cumprod(-1)
        J = within.sum(-1, keepdim=True)
        c_J = torch.where(J > 0, c.gather(-1, (J - 1).clamp_min(0)), torch.zeros((), dtype=c.dtype, device=c.device))
        return p_x + c_J.squeeze(-1), nbr, within.bool() & valid, c_J.squeeze(-1)

    def modified_target(self, draft_tokens, target_probs):
        """``p~``: [...] drafts, [..., V] target rows -> [..., V], the J-prefix of each draft's neighbours
        moved onto it. With a deterministic draft the emitted token is distributed exactly as ``p~``."""
        p = target_probs
        _, nbr, moved, c_J = self._terms(draft_tokens, p)
        if nbr.shape[-1] == 0:
            return p.clone()
        hits = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
        hits.scatter_add_(-1, nbr.clamp_min(0), moved.to(p.dtype))  # duplicates add up, never race
        return p.masked_fill(hits > 0, 0.0).scatter_add(-1, draft_tokens.unsqueeze(-1), c_J.unsqueeze(-1))

    def acceptance(self, draft_tokens, draft_probs, target_probs):
        pt_x = self._terms(draft_tokens, target_probs)[0]
        if draft_probs is None:
            return pt_x.clamp(0.0, 1.0)
        q_x = gather_token_probs(draft_probs, draft_tokens)
        return (pt_x / q_x.clamp_min(torch.finfo(q_x.dtype).tiny)).clamp(0.0, 1.0)

    def greedy_accept(self, draft_tokens, scores):
        """Greedy LANTERN: [B, K] drafts, [B, K, V] processed scores -> BoolTensor [B, K], True where the draft
        is the argmax of ``p = softmax(scores)`` once ``p(x)`` is raised to ``p~(x)``."""
        dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
        p = scores.to(dtype).softmax(-1)
        boosted = p.scatter(-1, draft_tokens.unsqueeze(-1), self._terms(draft_tokens, p)[0].unsqueeze(-1))
        return boosted.argmax(-1) == draft_tokens

    def residual(self, draft_tokens, draft_probs, target_probs):
        pt = self.modified_target(draft_tokens, target_probs)
        if draft_probs is None:
            return pt.scatter(-1, draft_tokens.unsqueeze(-1), 0.0)
        return (pt - draft_probs).clamp_min(0.0)


def modified_target(criterion, draft_tokens: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """The exact distribution of the token emitted at a position verified with a *deterministic* draft.

    Works for any criterion (a name or an object): ``a * onehot(x) + (1 - a) * normalize(residual)``
    (residual falling back to ``p`` as the core does). For ``lantern`` this is ``p~``; for ``exact`` it is
    ``p``; for ``gsd`` it puts ``min(1, p(group))`` on ``x``.

    Args:
        draft_tokens: LongTensor [...] of drafts.
        target_probs: [..., V] target rows.
    Returns:
        [..., V] probabilities (same dtype as ``target_probs``).
    """
    crit = get(criterion)
    if hasattr(crit, "modified_target"):
        return crit.modified_target(draft_tokens, target_probs)
    V = target_probs.shape[-1]
    x = draft_tokens.reshape(-1)
    p = target_probs.reshape(-1, V)
    a = crit.acceptance(x.unsqueeze(1), None, p.unsqueeze(1)).squeeze(1).to(p.dtype)
    w = crit.residual(x, None, p)
    mass = w.sum(-1, keepdim=True)
    r = torch.where(mass > 0, w / mass.clamp_min(torch.finfo(p.dtype).tiny), p)
    out = (1.0 - a).unsqueeze(-1) * r
    out = out.scatter_add(-1, x.unsqueeze(-1), a.unsqueeze(-1))
    return out.reshape(*draft_tokens.shape, V)


def deviation(criterion, draft_tokens: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Total-variation distance [...] between ``modified_target(...)`` and ``p`` (deterministic drafts)."""
    return 0.5 * (modified_target(criterion, draft_tokens, target_probs) - target_probs).abs().sum(-1)
