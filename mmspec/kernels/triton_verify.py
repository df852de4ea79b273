"""Fused verification in Triton: raw logits -> pipeline -> acceptance (exact, LANTERN, GSD) -> emitted token.

Two launches per step, each row of the [B, K+1, V] logits read once in the common case:

``_row_kernel``, one program per row ``(b, i)`` of the window:
    pass 1 streams the row once: guidance ``u + s (c - u)``, temperature, the greedy argmax, the row's max
    and min and an online softmax sum (running max, rescaled sum) in float32 (float64 for float64 logits).
    Without top-k / top-p that is all the row needs. Then, for ``i < K``, it gathers ``p_i(x_i)`` (and
    ``q_i(x_i)``) and decides acceptance ``u_i <= min(1, p/q)`` in float64, or ``x_i == argmax`` for a
    greedy row. Row statistics (max, 1/sum, keep-threshold) go to a [B, K+1] scratch, not the p rows:
    those are written only when ``return_probs=True`` (one more pass).
``_emit_kernel``, one program per batch row ``b``:
    the first rejection ``n`` (first zero of the accept flags), then one pass over row ``n`` that rebuilds
    ``p_n`` from the logits and the row statistics and draws the emitted token as ``argmax(w / E)`` over the
    residual ``w = max(p_n - q_n, 0)`` (``p_n`` with ``x_n`` removed for a deterministic draft), or over
    ``p_{K+1}`` for the bonus. No normalisation: the argmax trick samples unnormalised weights exactly.
    An empty residual (``p == q`` up to rounding) falls back to ``p_n`` with a second pass (rare).
    Greedy rows just read the stored argmax. Then it writes num_accepted, next_token and the packed tokens.

Top-k and top-p without a sort. Both keep ``{x >= T}`` for one per-row threshold ``T`` that is a value of
the row, found by a search over the float's order-preserving integer key: each pass over the row
evaluates 16 pivots at once (a [block, 16] compare), so the key interval shrinks ~16x per pass and a
float32 row needs about 8 passes (float64 about 16), read from L2 on a GPU.
* top-k: ``T`` is the largest value with ``count(x >= T) >= k`` (the k-th largest, ties kept, as
  ``torch.topk(...)[-1]`` + ``x < kth`` masking).
* top-p: ``T`` is the smallest value with ``mass(x <= T) > 1 - top_p`` (masses normalised over the top-k
  survivors), which is transformers' rule "remove the ascending prefix whose cumulative mass is <=
  1 - top_p, always keep the top token" evaluated per value instead of per sorted position.

Where bits may differ from the torch reference (``reference.py``); the distribution does not:
* softmax: the kernel's exp and its summation order (online, blocked) differ from torch's, so p differs
  in the last bits (~1e-7 relative). An acceptance decision ``u <= p/q`` or an ``argmax(w/E)`` can
  therefore flip only when ``u`` is within that of the ratio or two candidates of ``w/E`` tie to ~1e-7:
  probability ~1e-7 per decision. On a GPU, Triton's float32 exp is the hardware ``ex2.approx`` (a few ulp)
  while torch calls an accurate expf, and torch's CUDA division by a scalar temperature may be a multiply by
  its reciprocal; the kernel divides with correct rounding (``div_rn``, as torch on the CPU) and is
  launched with FMA contraction off, so guidance rounds ``s * (c - u)`` and the add separately as torch does.
* top-p boundary: the kernel compares ``mass(x <= T)`` summed in blocked order with ``1 - top_p`` where torch
  compares a sorted cumsum; they disagree only when the boundary mass is within rounding of ``1 - top_p``.
  Ties at the top-p boundary are all kept by the kernel, while a sort keeps an order-dependent subset.
* greedy rows use the argmax of the guided logits (first index on ties), exactly as the reference.
* LANTERN / GSD sums: the kernel's cumulative neighbour mass is a blocked scan and GSD's group sums are tree
  reductions; torch's CPU cumsum accumulates in double. A moved prefix ``J``, a group membership
  ``|p(y) - p(x)| < delta_p`` / ``d(x, y) < d_max`` or a rank order can therefore differ only at a near-tie
  within rounding, like the acceptance decisions above.

The relaxed criteria, in the same two launches (``CRIT`` is a compile-time switch, so exact pays nothing):
* LANTERN (``mmspec.acceptance.Lantern``): for a sampled draft ``x_i`` the row program gathers p at the
  neighbour ids of the precomputed int64 table row of ``x_i`` (nearest first), scans their cumulative mass
  in tiles and stops at the first ``c_j > bound`` (``delta``, or ``(lam - 1) p(x)``): ``J`` and ``c_J`` go to
  a [B, K] scratch and the acceptance is ``min(1, (p(x) + c_J) / q(x))``. At a rejection the emit program
  marks the ``J`` moved neighbours in a [B, V] int8 scratch and races over ``p~`` (moved ids 0, ``x``
  ``p(x) + c_J``) minus ``q`` (or with ``x`` removed for a deterministic draft).
* GSD (``mmspec.acceptance.GSD``): the rank window of ``x`` (the ``(G-1)//2`` tokens ranked just above it,
  ``G//2`` just below, by GSD's key ``bits(float32 p) * V + (V - 1 - id)``) is found without a sort by the
  same pivot search over int64 keys (``count(k_x < key <= t)``, ``count(t <= key < k_x)``, ~12 passes
  each), its ids compacted into a [B*K, G] scratch by one more pass; only those are then tested
  (``|p(y) - p(x)| < delta_p``, image tokens, squared embedding distance ``< d_max`` from the embedding
  rows) and summed: acceptance ``min(1, p(group) / q(group))``. Its residual is exact's.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..acceptance import GSD, Lantern
from .request import FusedVerifyOutput, VerifyRequest, compute_dtype

__all__ = ["run", "INTERPRETED"]

from .triton_rows import (
    _LOG2_PIVOTS,
    _NUM_PIVOTS,
    _div,
    _from_key,
    _gsd_mass,
    _kept_sum,
    _lantern_prefix,
    _p_at,
    _prob,
    _scores,
    _search,
    _to_key,
)


@triton.jit(do_not_specialize=["top_k", "n_up", "n_dn", "tab_rows", "tab_off", "tab_w", "emb_rows", "emb_off",
                               "emb_dim"])
def _row_kernel(
    logits_ptr, s_lb, s_lk, s_lv,
    uncond_ptr, s_ub, s_uk, s_uv,
    draft_ptr, s_db, s_dk,
    q_ptr, s_qb, s_qk, s_qv,
    u_ptr, s_nb, s_nk,
    greedy_ptr, params_ptr,
    argmax_ptr, max_ptr, inv_sum_ptr, thr_ptr, accept_ptr,
    probs_ptr, s_pb, s_pk, s_pv,
    tab_ptr, s_tr, s_tc, tab_rows, tab_off, tab_w,
    emb_ptr, s_er, s_ed, emb_rows, emb_off, emb_dim,
    jn_ptr, cj_ptr, ids_ptr,
    K, V, top_k, n_up, n_dn,
    HAS_UNCOND: tl.constexpr, APPLY_TEMP: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
    HAS_Q: tl.constexpr, WRITE_PROBS: tl.constexpr, DT: tl.constexpr, RATIO_DT: tl.constexpr,
    CRIT: tl.constexpr, LAM: tl.constexpr, HAS_EMB: tl.constexpr, FINITE_D: tl.constexpr, EMB_DT: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr, NPIV: tl.constexpr, LOG2_NPIV: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // (K + 1)
    i = row % (K + 1)
    lrow = logits_ptr + b.to(tl.int64) * s_lb + i.to(tl.int64) * s_lk
    urow = uncond_ptr + b.to(tl.int64) * s_ub + i.to(tl.int64) * s_uk
    cfg_scale = tl.load(params_ptr + 0).to(DT)
    temperature = tl.load(params_ptr + 1).to(DT)
    cut = tl.load(params_ptr + 2).to(DT)
    q_tiny = tl.load(params_ptr + 3).to(RATIO_DT)
    is_greedy = tl.load(greedy_ptr + b) != 0
    cols = tl.arange(0, BLOCK_V)

    # Pass 1: argmax of the guided logits, max / min / online sum of the scaled ones.
    best_val = tl.full([], float("-inf"), DT)
    best_idx = tl.full([], 0, tl.int32)
    row_max = tl.full([], float("-inf"), DT)
    row_min = tl.full([], float("inf"), DT)
    run_sum = tl.full([], 0.0, DT)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        guided, x = _scores(lrow, urow, offs, mask, s_lv, s_uv, cfg_scale, temperature, HAS_UNCOND, APPLY_TEMP, DT)
        c_val = tl.max(guided, axis=0)
        c_idx = tl.argmax(guided, axis=0)
        take = c_val > best_val  # strict: the first index wins ties, as torch.argmax
        best_idx = tl.where(take, start + c_idx, best_idx)
        best_val = tl.where(take, c_val, best_val)
        new_max = tl.maximum(row_max, tl.max(x, axis=0))
        ref = tl.where(new_max == float("-inf"), 0.0, new_max)  # all -inf so far: keep the sum at 0
        run_sum = run_sum * tl.exp(row_max - ref) + tl.sum(tl.exp(x - ref), axis=0)
        row_max = new_max
        row_min = tl.minimum(row_min, tl.min(tl.where(mask, x, float("inf")), axis=0))
    tl.store(argmax_ptr + row, best_idx)

    threshold = tl.full([], float("-inf"), DT)
    inv_sum = tl.full([], 1.0, DT)
    if (is_greedy == 0) | WRITE_PROBS:
        total = run_sum
        if TOP_K:  # the top_k-th largest, ties counted: the largest key t with count(x >= t) >= top_k
            kth, _kth_hi = _search(_to_key(row_min, DT), _to_key(row_max, DT) + 1, top_k, lrow, urow, s_lv,
                                   s_uv, cfg_scale, temperature, V, row_max, inv_sum, threshold, 0, 0, HAS_UNCOND,
                                   APPLY_TEMP, DT, BLOCK_S, NPIV, LOG2_NPIV)
            threshold = _from_key(kth, DT)
            total = _kept_sum(lrow, urow, s_lv, s_uv, cfg_scale, temperature, V, row_max, threshold,
                              HAS_UNCOND, APPLY_TEMP, DT, BLOCK_V)
        if TOP_P:  # the smallest T with mass(x <= T) > 1 - top_p; the top token is always kept
            _kept_lo, kept = _search(_to_key(threshold, DT) - 1, _to_key(row_max, DT), cut, lrow, urow, s_lv,
                                     s_uv, cfg_scale, temperature, V, row_max, _div(1.0, total, DT), threshold, 0,
                                     1, HAS_UNCOND, APPLY_TEMP, DT, BLOCK_S, NPIV, LOG2_NPIV)
            threshold = _from_key(kept, DT)
            total = _kept_sum(lrow, urow, s_lv, s_uv, cfg_scale, temperature, V, row_max, threshold,
                              HAS_UNCOND, APPLY_TEMP, DT, BLOCK_V)
        inv_sum = _div(1.0, total, DT)
        tl.store(max_ptr + row, row_max)
        tl.store(inv_sum_ptr + row, inv_sum)
        tl.store(thr_ptr + row, threshold)

    if i < K:
        x_i = tl.load(draft_ptr + b.to(tl.int64) * s_db + i * s_dk).to(tl.int64)
        accept = x_i == best_idx
        if is_greedy == 0:
            in_vocab = (x_i >= 0) & (x_i < V)
            p_x = _p_at(lrow, urow, x_i, in_vocab, s_lv, s_uv, cfg_scale, temperature, row_max, inv_sum, threshold,
                        HAS_UNCOND, APPLY_TEMP, DT)
            qrow = q_ptr + b.to(tl.int64) * s_qb + i.to(tl.int64) * s_qk
            mass = p_x
            q_mass = tl.full([], 1.0, RATIO_DT)
            if HAS_Q:
                q_mass = tl.load(qrow + tl.where(in_vocab, x_i, 0) * s_qv, mask=in_vocab, other=1.0).to(RATIO_DT)
            if CRIT == 1:  # LANTERN: the moved neighbour mass goes onto x
                bound = tl.load(params_ptr + 4).to(DT)
                if LAM:
                    bound = bound * p_x
                J, c_J = _lantern_prefix(lrow, urow, s_lv, s_uv, cfg_scale, temperature, V, row_max, inv_sum,
                                         threshold, tab_ptr, s_tr, s_tc, tab_rows, tab_off, tab_w, x_i, bound,
                                         HAS_UNCOND, APPLY_TEMP, DT, BLOCK_W)
                tl.store(jn_ptr + b * K + i, J)
                tl.store(cj_ptr + b * K + i, c_J)
                mass = p_x + c_J
            elif CRIT == 2:  # GSD: the masses of x's group
                p_sum, q_sum = _gsd_mass(lrow, urow, s_lv, s_uv, cfg_scale, temperature, V, row_max, inv_sum,
                                         threshold, x_i, p_x, qrow, s_qv, n_up, n_dn,
                                         ids_ptr + (b * K + i).to(tl.int64) * BLOCK_G, emb_ptr, s_er, s_ed,
                                         emb_rows, emb_off, emb_dim, tl.load(params_ptr + 5).to(DT),
                                         tl.load(params_ptr + 6).to(EMB_DT), HAS_UNCOND, APPLY_TEMP, DT, RATIO_DT,
                                         HAS_Q, HAS_EMB, FINITE_D, EMB_DT, BLOCK_V, BLOCK_S, BLOCK_G, BLOCK_D, NPIV,
                                         LOG2_NPIV)
                mass = p_x + p_sum
                q_mass = q_mass + q_sum
            ratio = mass.to(RATIO_DT)
            if HAS_Q:
                ratio = _div(ratio, tl.maximum(q_mass, q_tiny), RATIO_DT)
            ratio = tl.minimum(tl.maximum(ratio, 0.0), 1.0)
            u_i = tl.load(u_ptr + b.to(tl.int64) * s_nb + i * s_nk)
            accept = u_i <= ratio.to(tl.float64)
        tl.store(accept_ptr + b * K + i, accept.to(tl.int8))

    if WRITE_PROBS:
        prow = probs_ptr + b.to(tl.int64) * s_pb + i.to(tl.int64) * s_pk
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            _, x = _scores(lrow, urow, offs, mask, s_lv, s_uv, cfg_scale, temperature, HAS_UNCOND, APPLY_TEMP, DT)
            tl.store(prow + offs * s_pv, _prob(x, row_max, inv_sum, threshold), mask=mask)


@triton.jit
def _draw(lrow, urow, qrow, erow, moved_row, s_lv, s_uv, s_qv, s_ev, cfg_scale, temperature, V, row_max, inv_sum,
          threshold, x_n, c_J, residual,
          HAS_UNCOND: tl.constexpr, APPLY_TEMP: tl.constexpr, HAS_Q: tl.constexpr, CRIT: tl.constexpr,
          DT: tl.constexpr, RATIO_DT: tl.constexpr, BLOCK_V: tl.constexpr):
    """-> (argmax(w / E), whether w has mass): w is the criterion's residual at the rejected draft ``x_n`` when
    ``residual``, else p itself. Padding lanes never win, so ids stay < V."""
    cols = tl.arange(0, BLOCK_V)
    best_val = tl.full([], -1.0, tl.float64)
    best_idx = tl.full([], 0, tl.int32)
    any_mass = tl.full([], 0, tl.int1)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        _, x = _scores(lrow, urow, offs, mask, s_lv, s_uv, cfg_scale, temperature, HAS_UNCOND, APPLY_TEMP, DT)
        p = _prob(x, row_max, inv_sum, threshold)
        target = p
        if CRIT == 1:  # LANTERN's p~: the moved neighbours' mass sits on x_n
            moved = tl.load(moved_row + offs, mask=mask & residual, other=0) != 0
            target = tl.where(offs == x_n, p + c_J, tl.where(moved, 0.0, p))
        if HAS_Q:
            q = tl.load(qrow + offs * s_qv, mask=mask & residual, other=0.0).to(RATIO_DT)
            w = tl.maximum(target.to(RATIO_DT) - q, 0.0)
        else:
            w = tl.where(offs == x_n, 0.0, target).to(RATIO_DT)
        w = tl.where(residual, w, p.to(RATIO_DT))
        any_mass = any_mass | (tl.max(w, axis=0) > 0)
        e = tl.load(erow + offs * s_ev, mask=mask, other=1.0)
        race = tl.where(mask, w.to(tl.float64) / e, -1.0)
        c_val = tl.max(race, axis=0)
        c_idx = tl.argmax(race, axis=0)
        take = c_val > best_val
        best_idx = tl.where(take, start + c_idx, best_idx)
        best_val = tl.where(take, c_val, best_val)
    return best_idx.to(tl.int64), any_mass


@triton.jit(do_not_specialize=["tab_off"])
def _emit_kernel(
    logits_ptr, s_lb, s_lk, s_lv,
    uncond_ptr, s_ub, s_uk, s_uv,
    draft_ptr, s_db, s_dk,
    q_ptr, s_qb, s_qk, s_qv,
    e_ptr, s_eb, s_ev,
    greedy_ptr, params_ptr,
    argmax_ptr, max_ptr, inv_sum_ptr, thr_ptr, accept_ptr,
    num_accepted_ptr, next_ptr, tokens_ptr, s_tb,
    tab_ptr, s_tr, s_tc, tab_off, jn_ptr, cj_ptr, moved_ptr,
    K, V,
    HAS_UNCOND: tl.constexpr, APPLY_TEMP: tl.constexpr, HAS_Q: tl.constexpr, CRIT: tl.constexpr,
    DT: tl.constexpr, RATIO_DT: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    b = tl.program_id(0)
    ks = tl.arange(0, BLOCK_K)
    accepted = tl.load(accept_ptr + b * K + ks, mask=ks < K, other=1)
    n = tl.min(tl.where((accepted == 0) & (ks < K), ks, K), axis=0)  # first rejection, K if none
    row = b * (K + 1) + n
    next_token = tl.load(argmax_ptr + row).to(tl.int64)

    if tl.load(greedy_ptr + b) == 0:
        lrow = logits_ptr + b.to(tl.int64) * s_lb + n.to(tl.int64) * s_lk
        urow = uncond_ptr + b.to(tl.int64) * s_ub + n.to(tl.int64) * s_uk
        qrow = q_ptr + b.to(tl.int64) * s_qb + n.to(tl.int64) * s_qk
        erow = e_ptr + b.to(tl.int64) * s_eb
        moved_row = moved_ptr + b.to(tl.int64) * V
        cfg_scale = tl.load(params_ptr + 0).to(DT)
        temperature = tl.load(params_ptr + 1).to(DT)
        row_max = tl.load(max_ptr + row)
        inv_sum = tl.load(inv_sum_ptr + row)
        threshold = tl.load(thr_ptr + row)
        rejected = n < K
        x_n = tl.load(draft_ptr + b.to(tl.int64) * s_db + n * s_dk, mask=rejected, other=-1).to(tl.int64)
        c_J = tl.full([], 0.0, DT)
        if CRIT == 1:  # mark LANTERN's moved neighbours of x_n (their p~ is 0) in this row's scratch
            J = tl.load(jn_ptr + b * K + n, mask=rejected, other=0)
            c_J = tl.load(cj_ptr + b * K + n, mask=rejected, other=0.0)
            trow = tab_ptr + tl.maximum(x_n - tab_off, 0) * s_tr
            for start in range(0, J, BLOCK_W):
                j = start + tl.arange(0, BLOCK_W)
                nbr = tl.load(trow + j * s_tc, mask=j < J, other=-1)
                tl.store(moved_row + nbr, tl.full([BLOCK_W], 1, tl.int8), mask=(j < J) & (nbr >= 0) & (nbr < V))
            tl.debug_barrier()
        next_token, any_mass = _draw(lrow, urow, qrow, erow, moved_row, s_lv, s_uv, s_qv, s_ev, cfg_scale,
                                     temperature, V, row_max, inv_sum, threshold, x_n, c_J, rejected, HAS_UNCOND,
                                     APPLY_TEMP, HAS_Q, CRIT, DT, RATIO_DT, BLOCK_V)
        if rejected & (any_mass == 0):  # empty residual (p == q up to rounding): sample p itself (rare)
            next_token, _ = _draw(lrow, urow, qrow, erow, moved_row, s_lv, s_uv, s_qv, s_ev, cfg_scale,
                                  temperature, V, row_max, inv_sum, threshold, x_n, c_J, n < 0, HAS_UNCOND,
                                  APPLY_TEMP, HAS_Q, CRIT, DT, RATIO_DT, BLOCK_V)

    tl.store(num_accepted_ptr + b, n.to(tl.int64))
    tl.store(next_ptr + b, next_token)
    pos = tl.arange(0, 2 * BLOCK_K)
    drafts = tl.load(draft_ptr + b.to(tl.int64) * s_db + pos * s_dk, mask=pos < K, other=-1).to(tl.int64)
    packed = tl.where(pos < n, drafts, tl.where(pos == n, next_token, -1))
    tl.store(tokens_ptr + b.to(tl.int64) * s_tb + pos, packed, mask=pos <= K)


def _interpreted() -> bool:
    return type(_row_kernel).__name__ == "InterpretedFunction"


INTERPRETED = _interpreted()
"""True when this module was imported with TRITON_INTERPRET=1: the kernels then run on the CPU (tests)."""

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


@functools.lru_cache(maxsize=64)
def _params(device, *values):
    """The float scalars as a float64 tensor on ``device`` (Triton passes Python floats as float32, which would
    round a float64 pipeline's temperature); cached, so a decoding loop copies them to the GPU once."""
    return torch.tensor(values, dtype=torch.float64, device=device)


def _or_stub(t, dtype, dim, device):
    """``t`` itself, or a one-element stand-in with zero strides where it is None or empty."""
    if t is not None and t.numel() > 0:
        return t
    return torch.zeros(1, dtype=dtype, device=device).as_strided((1,) * dim, (0,) * dim)


class _CriterionArgs:
    """The kernel arguments of a criterion: CRIT 0 exact, 1 LANTERN (neighbour table), 2 GSD (rank window)."""

    def __init__(self, criterion, V, device):
        self.crit, self.lam, self.bound, self.delta_p, self.d_max = 0, False, 0.0, 0.0, math.inf
        self.table = self.emb = None
        self.tab_off = self.emb_off = self.n_up = self.n_dn = 0
        if isinstance(criterion, Lantern):
            table = criterion._table_on(device, V)  # [rows, w] token ids, -1 for none; checked against V
            if table.shape[1]:  # no neighbours at all: exactly exact
                self.crit, self.table, self.tab_off = 1, table, criterion._row_offset
                self.lam = criterion.lam is not None
                self.bound = criterion.lam - 1.0 if self.lam else criterion.delta
        elif isinstance(criterion, GSD) and criterion.group_size > 1 and criterion.delta_p > 0.0:
            self.n_up = min((criterion.group_size - 1) // 2, V - 1)
            self.n_dn = min(criterion.group_size // 2, V - 1)
            if self.n_up + self.n_dn:
                self.crit, self.delta_p, self.d_max = 2, criterion.delta_p, criterion.d_max
                if criterion._emb is not None:
                    self.emb, self.emb_off = criterion._emb_on(device), criterion.image_token_offset

    def row_args(self, device):
        table = _or_stub(self.table, torch.int64, 2, device)
        emb = _or_stub(self.emb, torch.float32, 2, device)
        tab_rows = self.table.shape[0] if self.table is not None else 0
        emb_rows, emb_dim = self.emb.shape if self.emb is not None else (0, 0)
        return (table, *table.stride(), tab_rows, self.tab_off, table.shape[1],
                emb, *emb.stride(), emb_rows, self.emb_off, emb_dim)

    def flags(self):
        has_emb = self.emb is not None
        emb_dt = tl.float64 if has_emb and self.emb.dtype == torch.float64 else tl.float32
        return dict(LAM=self.lam, HAS_EMB=has_emb, FINITE_D=has_emb and math.isfinite(self.d_max), EMB_DT=emb_dt)


def run(request: VerifyRequest, block_v: int | None = None, block_w: int | None = None) -> FusedVerifyOutput:
    """The Triton implementation of ``mmspec.kernels.reference.run`` (same request, same result).

    ``block_v`` overrides the vocabulary tile and ``block_w`` LANTERN's neighbour tile (powers of two; tests
    use small tiles to cross tile edges).
    """
    r = request
    B, K, V = r.shape
    target_logits, draft_probs, pipe = r.target_logits, r.draft_probs, r.pipeline
    device = target_logits.device
    dt = compute_dtype(target_logits)
    ratio_dt = dt if draft_probs is None else torch.promote_types(dt, draft_probs.dtype)
    if ratio_dt not in _TL_DTYPE:
        raise ValueError(f"`draft_probs` of dtype {draft_probs.dtype} is not supported; use a float dtype.")
    if isinstance(r.greedy, torch.Tensor):
        greedy_rows = r.greedy.to(torch.int8).contiguous()
    else:
        greedy_rows = torch.full((B,), int(r.greedy), dtype=torch.int8, device=device)
    crit = _CriterionArgs(r.criterion, V, device)

    top_k_on = bool(pipe.top_k) and pipe.top_k < V
    top_p_on = pipe.top_p is not None and pipe.top_p < 1.0
    q_tiny = torch.finfo(draft_probs.dtype).tiny if draft_probs is not None else 0.0
    params = _params(device, float(r.guidance_scale or 0.0), float(pipe.temperature), 1.0 - float(pipe.top_p or 0.0),
                     q_tiny, float(crit.bound), float(crit.delta_p), float(crit.d_max))
    # Stand-ins keep the signatures fixed for absent or empty (K = 0) inputs; the constexpr flags, the
    # greedy branch and the masks make sure they are never read.
    uncond = r.uncond_logits if r.uncond_logits is not None else target_logits
    q = _or_stub(draft_probs, target_logits.dtype, 3, device)
    u_t = _or_stub(r.u, torch.float64, 2, device)
    e_t = _or_stub(r.E, torch.float64, 2, device)
    draft_tokens = _or_stub(r.draft_tokens, torch.int64, 2, device)

    rows = B * (K + 1)
    argmax = torch.empty(rows, dtype=torch.int32, device=device)
    row_max = torch.empty(rows, dtype=dt, device=device)
    inv_sum = torch.empty(rows, dtype=dt, device=device)
    threshold = torch.empty(rows, dtype=dt, device=device)
    accept = torch.empty(max(B * K, 1), dtype=torch.int8, device=device)
    probs = torch.empty(B, K + 1, V, dtype=dt, device=device) if r.return_probs else row_max
    p_strides = probs.stride() if r.return_probs else (0, 0, 0)
    num_accepted = torch.empty(B, dtype=torch.int64, device=device)
    next_token = torch.empty(B, dtype=torch.int64, device=device)
    tokens = torch.empty(B, K + 1, dtype=torch.int64, device=device)
    if B == 0:
        return FusedVerifyOutput(num_accepted, tokens, next_token, probs if r.return_probs else None)
    # Criterion scratch: LANTERN's J and c_J per draft and its moved-neighbour marks of the emitted row;
    # GSD's compacted rank windows.
    block_g = triton.next_power_of_2(max(crit.n_up + crit.n_dn, 1))
    jn = torch.empty(max(B * K, 1) if crit.crit == 1 else 1, dtype=torch.int32, device=device)
    cj = torch.empty(max(B * K, 1) if crit.crit == 1 else 1, dtype=dt, device=device)
    moved = torch.zeros((B, V) if crit.crit == 1 else (1,), dtype=torch.int8, device=device)
    ids = torch.empty(max(B * K, 1) * block_g if crit.crit == 2 else 1, dtype=torch.int64, device=device)

    if block_v is None:
        block_v = min(triton.next_power_of_2(V), 1024 if INTERPRETED else 2048)
    if block_w is None:
        block_w = min(triton.next_power_of_2(crit.table.shape[1]), 256) if crit.table is not None else 1
    for name, value in (("block_v", block_v), ("block_w", block_w)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"`{name}` must be a power of two, got {value}.")
    block_s = min(block_v, 512)  # search passes hold a [block, 16] tile
    block_k = triton.next_power_of_2(max(K, 1))
    block_d = min(triton.next_power_of_2(crit.emb.shape[1]), 128) if crit.emb is not None else 1
    # No FMA contraction: torch rounds ``s * (c - u)`` and the add separately; so does the kernel.
    launch = {} if INTERPRETED else {"num_warps": 8, "enable_fp_fusion": False}
    flags = dict(HAS_UNCOND=r.uncond_logits is not None, APPLY_TEMP=float(pipe.temperature) != 1.0,
                 HAS_Q=draft_probs is not None, DT=_TL_DTYPE[dt], RATIO_DT=_TL_DTYPE[ratio_dt], CRIT=crit.crit,
                 BLOCK_V=block_v, BLOCK_W=block_w, **launch)

    common = (
        target_logits, *target_logits.stride(),
        uncond, *uncond.stride(),
        draft_tokens, *draft_tokens.stride(),
        q, *q.stride(),
    )
    stats = (greedy_rows, params, argmax, row_max, inv_sum, threshold, accept)
    _row_kernel[(rows,)](
        *common,
        u_t, *u_t.stride(),
        *stats,
        probs, *p_strides,
        *crit.row_args(device),
        jn, cj, ids,
        K, V, int(pipe.top_k or 0), crit.n_up, crit.n_dn,
        TOP_K=top_k_on, TOP_P=top_p_on, WRITE_PROBS=r.return_probs, BLOCK_S=block_s, BLOCK_G=block_g,
        BLOCK_D=block_d, NPIV=_NUM_PIVOTS, LOG2_NPIV=_LOG2_PIVOTS, **crit.flags(), **flags,
    )
    table = crit.row_args(device)[0]
    _emit_kernel[(B,)](
        *common,
        e_t, *e_t.stride(),
        *stats,
        num_accepted, next_token, tokens, tokens.stride(0),
        table, *table.stride(), crit.tab_off, jn, cj, moved,
        K, V, BLOCK_K=block_k, **flags,
    )
    return FusedVerifyOutput(num_accepted, tokens, next_token, probs if r.return_probs else None)
