"""Fused exact verification in Triton: raw logits -> pipeline -> acceptance -> emitted token.

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
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .reference import FusedVerifyOutput, check_inputs, compute_dtype

__all__ = ["verify_from_logits_triton", "INTERPRETED"]

_NUM_PIVOTS = 16
_LOG2_PIVOTS = 4


@triton.jit
def _div(x, y, DT: tl.constexpr):
    """Correctly rounded division (Triton's float32 ``/`` is approximate on GPUs; torch's is not)."""
    if DT == tl.float64:
        res = x / y
    else:
        res = tl.math.div_rn(x, y)
    return res


@triton.jit
def _scores(row_ptr, urow_ptr, offs, mask, stride_v, ustride_v, cfg_scale, temperature,
            HAS_UNCOND: tl.constexpr, APPLY_TEMP: tl.constexpr, DT: tl.constexpr):
    """-> (guided, scaled): guided logits (greedy's argmax) and guided / temperature; -inf off the row."""
    guided = tl.load(row_ptr + offs * stride_v, mask=mask, other=0.0).to(DT)
    if HAS_UNCOND:
        unc = tl.load(urow_ptr + offs * ustride_v, mask=mask, other=0.0).to(DT)
        guided = unc + cfg_scale * (guided - unc)
    guided = tl.where(mask, guided, float("-inf"))
    scaled = guided
    if APPLY_TEMP:
        scaled = _div(guided, temperature, DT)
    return guided, scaled


@triton.jit
def _prob(scaled, row_max, inv_sum, threshold):
    """p for scaled logits given the row statistics; 0 below the top-k / top-p threshold."""
    return tl.where(scaled >= threshold, tl.exp(scaled - row_max) * inv_sum, 0.0)


@triton.jit
def _to_key(x, DT: tl.constexpr):
    """Float -> int64 key with the same order (negative floats: flip the magnitude bits)."""
    if DT == tl.float64:
        bits = x.to(tl.int64, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFFFFFFFFFF)
    else:
        bits32 = x.to(tl.int32, bitcast=True)
        key = tl.where(bits32 >= 0, bits32, bits32 ^ 0x7FFFFFFF).to(tl.int64)
    return key


@triton.jit
def _from_key(key, DT: tl.constexpr):
    if DT == tl.float64:
        bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFFFFFFFFFF)
        x = bits.to(tl.float64, bitcast=True)
    else:
        key32 = key.to(tl.int32)
        bits32 = tl.where(key32 >= 0, key32, key32 ^ 0x7FFFFFFF)
        x = bits32.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _pivots(lo, hi, NPIV: tl.constexpr, LOG2_NPIV: tl.constexpr):
    """NPIV keys in (lo, hi], spaced ~(hi - lo) / NPIV, never overflowing int64 (float64 keys span ~2^64)."""
    half_step = ((hi >> 1) - (lo >> 1)) >> LOG2_NPIV
    j = tl.arange(0, NPIV).to(tl.int64) + 1
    piv = lo + j * half_step
    piv = piv + j * half_step + j
    return tl.minimum(piv, hi)


@triton.jit
def _topk_threshold(row_ptr, urow_ptr, stride_v, ustride_v, cfg_scale, temperature, V, top_k, row_min, row_max,
                    HAS_UNCOND: tl.constexpr, APPLY_TEMP: tl.constexpr, DT: tl.constexpr,
                    BLOCK: tl.constexpr, NPIV: tl.constexpr, LOG2_NPIV: tl.constexpr):
    """The top_k-th largest scaled logit, ties counted: the largest key t with count(x >= t) >= top_k."""
    lo = _to_key(row_min, DT)  # count(x >= min) = V >= top_k
    hi = _to_key(row_max, DT) + 1  # count(x >= next float after max) = 0 < top_k
    cols = tl.arange(0, BLOCK)
    while lo + 1 < hi:
        piv = _pivots(lo, hi, NPIV, LOG2_NPIV)
        pval = _from_key(piv, DT)
        count = tl.zeros([NPIV], dtype=tl.int32)
        for start in range(0, V, BLOCK):
            offs = start + cols
            _, x = _scores(row_ptr, urow_ptr, offs, offs < V, stride_v, ustride_v, cfg_scale, temperature,
                           HAS_UNCOND, APPLY_TEMP, DT)
            count += tl.sum((x[:, None] >= pval[None, :]).to(tl.int32), axis=0)
        ok = count >= top_k  # true on a prefix of the pivots
        lo = tl.maximum(lo, tl.max(tl.where(ok, piv, lo), axis=0))
        hi = tl.minimum(hi, tl.min(tl.where(ok, hi, piv), axis=0))
    return _from_key(lo, DT)


@triton.jit
def _topp_threshold(row_ptr, urow_ptr, stride_v, ustride_v, cfg_scale, temperature, V, floor, row_max, inv_sum, cut,
                    HAS_UNCOND: tl.constexpr, APPLY_TEMP: tl.constexpr, DT: tl.constexpr,
                    BLOCK: tl.constexpr, NPIV: tl.constexpr, LOG2_NPIV: tl.constexpr):
    """The smallest scaled logit T with mass(x <= T) > cut = 1 - top_p, masses over x >= floor (top-k)."""
    lo = _to_key(floor, DT) - 1  # mass below every kept value: 0 <= cut
    hi = _to_key(row_max, DT)  # the top token is always kept, whatever the rounding of mass(x <= max)
    cols = tl.arange(0, BLOCK)
    while lo + 1 < hi:
        piv = _pivots(lo, hi, NPIV, LOG2_NPIV)
        pval = _from_key(piv, DT)
        mass = tl.zeros([NPIV], dtype=DT)
        for start in range(0, V, BLOCK):
            offs = start + cols
            _, x = _scores(row_ptr, urow_ptr, offs, offs < V, stride_v, ustride_v, cfg_scale, temperature,
                           HAS_UNCOND, APPLY_TEMP, DT)
            p = _prob(x, row_max, inv_sum, floor)
            mass += tl.sum(tl.where(x[:, None] <= pval[None, :], p[:, None], 0.0), axis=0)
        ok = mass <= cut  # removable: true on a prefix of the pivots (the sums are monotone)
        lo = tl.maximum(lo, tl.max(tl.where(ok, piv, lo), axis=0))
        hi = tl.minimum(hi, tl.min(tl.where(ok, hi, piv), axis=0))
    return _from_key(hi, DT)


@triton.jit
def _kept_sum(row_ptr, urow_ptr, stride_v, ustride_v, cfg_scale, temperature, V, row_max, threshold,
              HAS_UNCOND: tl.constexpr, APPLY_TEMP: tl.constexpr, DT: tl.constexpr, BLOCK: tl.constexpr):
    total = tl.zeros([BLOCK], dtype=DT)
    cols = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        offs = start + cols
        _, x = _scores(row_ptr, urow_ptr, offs, offs < V, stride_v, ustride_v, cfg_scale, temperature,
                       HAS_UNCOND, APPLY_TEMP, DT)
        total += tl.where(x >= threshold, tl.exp(x - row_max), 0.0)
    return tl.sum(total, axis=0)


@triton.jit
def _row_kernel(
    logits_ptr, s_lb, s_lk, s_lv,
    uncond_ptr, s_ub, s_uk, s_uv,
    draft_ptr, s_db, s_dk,
    q_ptr, s_qb, s_qk, s_qv,
    u_ptr, s_nb, s_nk,
    greedy_ptr, params_ptr,
    argmax_ptr, max_ptr, inv_sum_ptr, thr_ptr, accept_ptr,
    probs_ptr, s_pb, s_pk, s_pv,
    K, V, top_k,
    HAS_UNCOND: tl.constexpr, APPLY_TEMP: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
    HAS_Q: tl.constexpr, WRITE_PROBS: tl.constexpr, DT: tl.constexpr, RATIO_DT: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr, NPIV: tl.constexpr, LOG2_NPIV: tl.constexpr,
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
        if TOP_K:
            threshold = _topk_threshold(lrow, urow, s_lv, s_uv, cfg_scale, temperature, V, top_k, row_min, row_max,
                                        HAS_UNCOND, APPLY_TEMP, DT, BLOCK_S, NPIV, LOG2_NPIV)
            total = _kept_sum(lrow, urow, s_lv, s_uv, cfg_scale, temperature, V, row_max, threshold,
                              HAS_UNCOND, APPLY_TEMP, DT, BLOCK_V)
        if TOP_P:
            threshold = _topp_threshold(lrow, urow, s_lv, s_uv, cfg_scale, temperature, V, threshold, row_max,
                                        _div(1.0, total, DT), cut, HAS_UNCOND, APPLY_TEMP, DT, BLOCK_S, NPIV,
                                        LOG2_NPIV)
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
            x_safe = tl.where(in_vocab, x_i, 0)
            _, t_x = _scores(lrow, urow, x_safe, in_vocab, s_lv, s_uv, cfg_scale, temperature,
                             HAS_UNCOND, APPLY_TEMP, DT)
            ratio = _prob(t_x, row_max, inv_sum, threshold).to(RATIO_DT)
            if HAS_Q:
                q_x = tl.load(q_ptr + b.to(tl.int64) * s_qb + i.to(tl.int64) * s_qk + x_safe * s_qv,
                              mask=in_vocab, other=1.0).to(RATIO_DT)
                ratio = _div(ratio, tl.maximum(q_x, q_tiny), RATIO_DT)
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
def _emit_kernel(
    logits_ptr, s_lb, s_lk, s_lv,
    uncond_ptr, s_ub, s_uk, s_uv,
    draft_ptr, s_db, s_dk,
    q_ptr, s_qb, s_qk, s_qv,
    e_ptr, s_eb, s_ev,
    greedy_ptr, params_ptr,
    argmax_ptr, max_ptr, inv_sum_ptr, thr_ptr, accept_ptr,
    num_accepted_ptr, next_ptr, tokens_ptr, s_tb,
    K, V,
    HAS_UNCOND: tl.constexpr, APPLY_TEMP: tl.constexpr, HAS_Q: tl.constexpr,
    DT: tl.constexpr, RATIO_DT: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
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
        cfg_scale = tl.load(params_ptr + 0).to(DT)
        temperature = tl.load(params_ptr + 1).to(DT)
        row_max = tl.load(max_ptr + row)
        inv_sum = tl.load(inv_sum_ptr + row)
        threshold = tl.load(thr_ptr + row)
        rejected = n < K
        x_n = tl.load(draft_ptr + b.to(tl.int64) * s_db + n * s_dk, mask=rejected, other=-1).to(tl.int64)
        cols = tl.arange(0, BLOCK_V)
        best_val = tl.full([], -1.0, tl.float64)
        best_idx = tl.full([], 0, tl.int32)
        any_mass = tl.full([], 0, tl.int1)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            _, x = _scores(lrow, urow, offs, mask, s_lv, s_uv, cfg_scale, temperature, HAS_UNCOND, APPLY_TEMP, DT)
            p = _prob(x, row_max, inv_sum, threshold).to(RATIO_DT)
            if HAS_Q:
                q = tl.load(qrow + offs * s_qv, mask=mask & rejected, other=0.0).to(RATIO_DT)
                w = tl.where(rejected, tl.maximum(p - q, 0.0), p)
            else:
                w = tl.where(rejected & (offs == x_n), 0.0, p)
            any_mass = any_mass | (tl.max(w, axis=0) > 0)
            e = tl.load(erow + offs * s_ev, mask=mask, other=1.0)
            race = tl.where(mask, w.to(tl.float64) / e, -1.0)  # padding lanes never win: ids stay < V
            c_val = tl.max(race, axis=0)
            c_idx = tl.argmax(race, axis=0)
            take = c_val > best_val
            best_idx = tl.where(take, start + c_idx, best_idx)
            best_val = tl.where(take, c_val, best_val)
        if rejected & (any_mass == 0):  # empty residual (p == q up to rounding): sample p itself
            best_val = tl.full([], -1.0, tl.float64)
            best_idx = tl.full([], 0, tl.int32)
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                mask = offs < V
                _, x = _scores(lrow, urow, offs, mask, s_lv, s_uv, cfg_scale, temperature,
                               HAS_UNCOND, APPLY_TEMP, DT)
                p = _prob(x, row_max, inv_sum, threshold)
                e = tl.load(erow + offs * s_ev, mask=mask, other=1.0)
                race = tl.where(mask, p.to(tl.float64) / e, -1.0)
                c_val = tl.max(race, axis=0)
                c_idx = tl.argmax(race, axis=0)
                take = c_val > best_val
                best_idx = tl.where(take, start + c_idx, best_idx)
                best_val = tl.where(take, c_val, best_val)
        next_token = best_idx.to(tl.int64)

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


def verify_from_logits_triton(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy=False,
    u: torch.Tensor | None = None,
    E: torch.Tensor | None = None,
    guidance_scale: float | None = None,
    uncond_logits: torch.Tensor | None = None,
    return_probs: bool = False,
    block_v: int | None = None,
) -> FusedVerifyOutput:
    """The Triton implementation of ``mmspec.kernels.reference.verify_from_logits`` (same arguments).

    ``block_v`` overrides the vocabulary tile (a power of two; tests use small tiles to cross tile edges).
    """
    greedy = check_inputs(draft_tokens, draft_probs, target_logits, temperature=temperature, top_k=top_k,
                          top_p=top_p, greedy=greedy, u=u, E=E, guidance_scale=guidance_scale,
                          uncond_logits=uncond_logits)
    B, K = draft_tokens.shape
    V = target_logits.shape[-1]
    device = target_logits.device
    dt = compute_dtype(target_logits)
    ratio_dt = dt if draft_probs is None else torch.promote_types(dt, draft_probs.dtype)
    if ratio_dt not in _TL_DTYPE:
        raise ValueError(f"`draft_probs` of dtype {draft_probs.dtype} is not supported; use a float dtype.")
    if isinstance(greedy, torch.Tensor):
        greedy_rows = greedy.to(torch.int8).contiguous()
    else:
        greedy_rows = torch.full((B,), int(greedy), dtype=torch.int8, device=device)

    top_k_on = bool(top_k) and top_k < V
    top_p_on = top_p is not None and top_p < 1.0
    q_tiny = torch.finfo(draft_probs.dtype).tiny if draft_probs is not None else 0.0
    params = _params(device, float(guidance_scale or 0.0), float(temperature), 1.0 - float(top_p or 0.0), q_tiny)
    # Stand-ins keep the signatures fixed for absent or empty (K = 0) inputs; the constexpr flags, the
    # greedy branch and the masks make sure they are never read.
    uncond = uncond_logits if uncond_logits is not None else target_logits
    q = _or_stub(draft_probs, target_logits.dtype, 3, device)
    u_t = _or_stub(u, torch.float64, 2, device)
    e_t = _or_stub(E, torch.float64, 2, device)
    draft_tokens = _or_stub(draft_tokens, torch.int64, 2, device)

    rows = B * (K + 1)
    argmax = torch.empty(rows, dtype=torch.int32, device=device)
    row_max = torch.empty(rows, dtype=dt, device=device)
    inv_sum = torch.empty(rows, dtype=dt, device=device)
    threshold = torch.empty(rows, dtype=dt, device=device)
    accept = torch.empty(max(B * K, 1), dtype=torch.int8, device=device)
    probs = torch.empty(B, K + 1, V, dtype=dt, device=device) if return_probs else row_max
    p_strides = probs.stride() if return_probs else (0, 0, 0)
    num_accepted = torch.empty(B, dtype=torch.int64, device=device)
    next_token = torch.empty(B, dtype=torch.int64, device=device)
    tokens = torch.empty(B, K + 1, dtype=torch.int64, device=device)
    if B == 0:
        return FusedVerifyOutput(num_accepted, tokens, next_token, probs if return_probs else None)

    if block_v is None:
        block_v = min(triton.next_power_of_2(V), 1024 if INTERPRETED else 2048)
    if block_v & (block_v - 1):
        raise ValueError(f"`block_v` must be a power of two, got {block_v}.")
    block_s = min(block_v, 512)  # search passes hold a [block, 16] tile
    block_k = triton.next_power_of_2(max(K, 1))
    # No FMA contraction: torch rounds ``s * (c - u)`` and the add separately; so does the kernel.
    launch = {} if INTERPRETED else {"num_warps": 8, "enable_fp_fusion": False}

    common = (
        target_logits, *target_logits.stride(),
        uncond, *uncond.stride(),
        draft_tokens, *draft_tokens.stride(),
        q, *q.stride(),
    )
    _row_kernel[(rows,)](
        *common,
        u_t, *u_t.stride(),
        greedy_rows, params,
        argmax, row_max, inv_sum, threshold, accept,
        probs, *p_strides,
        K, V, int(top_k or 0),
        HAS_UNCOND=uncond_logits is not None, APPLY_TEMP=float(temperature) != 1.0, TOP_K=top_k_on,
        TOP_P=top_p_on, HAS_Q=draft_probs is not None, WRITE_PROBS=return_probs, DT=_TL_DTYPE[dt],
        RATIO_DT=_TL_DTYPE[ratio_dt], BLOCK_V=block_v, BLOCK_S=block_s, NPIV=_NUM_PIVOTS,
        LOG2_NPIV=_LOG2_PIVOTS, **launch,
    )
    _emit_kernel[(B,)](
        *common,
        e_t, *e_t.stride(),
        greedy_rows, params,
        argmax, row_max, inv_sum, threshold, accept,
        num_accepted, next_token, tokens, tokens.stride(0),
        K, V,
        HAS_UNCOND=uncond_logits is not None, APPLY_TEMP=float(temperature) != 1.0, HAS_Q=draft_probs is not None,
        DT=_TL_DTYPE[dt], RATIO_DT=_TL_DTYPE[ratio_dt], BLOCK_V=block_v, BLOCK_K=block_k, **launch,
    )
    return FusedVerifyOutput(num_accepted, tokens, next_token, probs if return_probs else None)
