"""Device functions the fused verification kernels (``triton_verify``) share: a row's guided, tempered scores,
its probabilities under top-k/top-p thresholds, order-preserving integer keys, the pivot search that finds a
threshold without sorting, and the LANTERN / GSD aggregates over a row. Split out so that each file reads on its
own; see ``triton_verify``'s docstring for the algorithms."""

from __future__ import annotations

import triton
import triton.language as tl

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
def _p_key(p, offs, V):
    """GSD's rank key of a probability: ``bits(float32 p) * V + (V - 1 - id)`` (higher p, then lower id)."""
    bits = (p.to(tl.float32) + 0.0).to(tl.int32, bitcast=True).to(tl.int64)  # + 0.0: -0.0 -> 0.0
    return bits * V + (V - 1 - offs)


@triton.jit
def _stat(row_ptr, urow_ptr, stride_v, ustride_v, cfg_scale, temperature, V, row_max, inv_sum, threshold, piv, k_x,
          MODE: tl.constexpr, HAS_UNCOND: tl.constexpr, APPLY_TEMP: tl.constexpr, DT: tl.constexpr,
          BLOCK: tl.constexpr, NPIV: tl.constexpr):
    """One pass over the row: a statistic for each of the NPIV int64 pivot keys ``piv``.

    MODE 0: count(x >= piv) over the scaled logits' keys (top-k); 1: mass(x <= piv) of p with the given
    statistics (top-p); 2: count(k_x < key <= piv) and 3: count(piv <= key < k_x) over GSD's rank keys.
    """
    acc = tl.zeros([NPIV], dtype=DT)
    cols = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        _, x = _scores(row_ptr, urow_ptr, offs, mask, stride_v, ustride_v, cfg_scale, temperature,
                       HAS_UNCOND, APPLY_TEMP, DT)
        if MODE == 0:
            hit = _to_key(x, DT)[:, None] >= piv[None, :]
            acc += tl.sum(hit.to(DT), axis=0)
        elif MODE == 1:
            p = _prob(x, row_max, inv_sum, threshold)
            acc += tl.sum(tl.where(_to_key(x, DT)[:, None] <= piv[None, :], p[:, None], 0.0), axis=0)
        else:
            key = _p_key(_prob(x, row_max, inv_sum, threshold), offs, V)
            if MODE == 2:
                hit = (mask & (key > k_x))[:, None] & (key[:, None] <= piv[None, :])
            else:
                hit = (mask & (key < k_x))[:, None] & (key[:, None] >= piv[None, :])
            acc += tl.sum(hit.to(DT), axis=0)
    return acc


@triton.jit
def _search(lo, hi, target, row_ptr, urow_ptr, stride_v, ustride_v, cfg_scale, temperature, V, row_max, inv_sum,
            threshold, k_x, MODE: tl.constexpr, HAS_UNCOND: tl.constexpr, APPLY_TEMP: tl.constexpr,
            DT: tl.constexpr, BLOCK: tl.constexpr, NPIV: tl.constexpr, LOG2_NPIV: tl.constexpr):
    """Shrink the int64 key interval (lo, hi] to hi = lo + 1 around the point where ``_stat`` crosses
    ``target``: a pivot is on the hi side when its statistic is < target (MODE 0, 3: the statistic falls
    with the key) or > target (MODE 1), >= target (MODE 2). The caller keeps ``lo`` or ``hi``."""
    while lo + 1 < hi:
        piv = _pivots(lo, hi, NPIV, LOG2_NPIV)
        st = _stat(row_ptr, urow_ptr, stride_v, ustride_v, cfg_scale, temperature, V, row_max, inv_sum, threshold,
                   piv, k_x, MODE, HAS_UNCOND, APPLY_TEMP, DT, BLOCK, NPIV)
        if MODE == 1:
            hi_side = st > target
        elif MODE == 2:
            hi_side = st >= target
        else:
            hi_side = st < target
        hi = tl.minimum(hi, tl.min(tl.where(hi_side, piv, hi), axis=0))
        lo = tl.maximum(lo, tl.max(tl.where(hi_side, lo, piv), axis=0))
    return lo, hi


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
def _p_at(row_ptr, urow_ptr, ids, valid, stride_v, ustride_v, cfg_scale, temperature, row_max, inv_sum, threshold,
          HAS_UNCOND: tl.constexpr, APPLY_TEMP: tl.constexpr, DT: tl.constexpr):
    """p at the token ids ``ids`` (any shape), 0 where not ``valid``: a gather from the logits."""
    safe = tl.where(valid, ids, 0)
    _, x = _scores(row_ptr, urow_ptr, safe, valid, stride_v, ustride_v, cfg_scale, temperature,
                   HAS_UNCOND, APPLY_TEMP, DT)
    return tl.where(valid, _prob(x, row_max, inv_sum, threshold), 0.0)


@triton.jit
def _lantern_prefix(row_ptr, urow_ptr, stride_v, ustride_v, cfg_scale, temperature, V, row_max, inv_sum, threshold,
                    tab_ptr, s_tr, s_tc, tab_rows, tab_off, W, x, bound,
                    HAS_UNCOND: tl.constexpr, APPLY_TEMP: tl.constexpr, DT: tl.constexpr, BLOCK_W: tl.constexpr):
    """LANTERN's moved prefix of draft ``x``: (J, c_J), J the number of leading neighbours whose cumulative
    mass c_j stays <= bound (a prefix: it stops at the first j past the bound) and c_J their mass."""
    rel = x - tab_off
    inside = (rel >= 0) & (rel < tab_rows)  # not an image token: no neighbours, nothing moves
    trow = tab_ptr + tl.where(inside, rel, 0) * s_tr
    cols = tl.arange(0, BLOCK_W)
    J = tl.full([], 0, tl.int32)
    c_J = tl.full([], 0.0, DT)
    carry = tl.full([], 0.0, DT)
    still = inside
    start = tl.full([], 0, tl.int32)
    while still & (start < W):
        j = start + cols
        m = j < W
        nbr = tl.load(trow + j * s_tc, mask=m, other=-1)
        valid = m & (nbr >= 0) & (nbr < V)
        pn = _p_at(row_ptr, urow_ptr, nbr, valid, stride_v, ustride_v, cfg_scale, temperature, row_max, inv_sum,
                   threshold, HAS_UNCOND, APPLY_TEMP, DT)
        c = carry + tl.cumsum(pn, axis=0)  # non-decreasing: p >= 0
        past = tl.cumsum((m & (c > bound)).to(tl.int32), axis=0)
        ok = m & (past == 0)
        J += tl.sum(ok.to(tl.int32), axis=0)
        c_J = tl.maximum(c_J, tl.max(tl.where(ok, c, 0.0), axis=0))
        carry = tl.max(tl.where(m, c, carry), axis=0)
        still = tl.max(past, axis=0) == 0
        start += BLOCK_W
    return J, c_J


@triton.jit
def _gsd_mass(row_ptr, urow_ptr, stride_v, ustride_v, cfg_scale, temperature, V, row_max, inv_sum, threshold,
              x, p_x, q_row, s_qv, n_up, n_dn, ids_row, emb_ptr, s_er, s_ed, emb_rows, emb_off, emb_dim,
              delta_p, d_max,
              HAS_UNCOND: tl.constexpr, APPLY_TEMP: tl.constexpr, DT: tl.constexpr, RATIO_DT: tl.constexpr,
              HAS_Q: tl.constexpr, HAS_EMB: tl.constexpr, FINITE_D: tl.constexpr, EMB_DT: tl.constexpr,
              BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
              NPIV: tl.constexpr, LOG2_NPIV: tl.constexpr):
    """GSD's group of draft ``x``: the masses (p, q) of its members other than ``x`` (q's only with HAS_Q).

    The rank window (the n_up keys just above x's, the n_dn just below) is found by two key searches, its ids
    compacted into ``ids_row`` [BLOCK_G] (scratch) by one more pass; only those few ids are then tested
    (|p(y) - p(x)| < delta_p, image tokens, embedding distance) and summed.
    """
    k_x = _p_key(p_x, x, V)
    top = tl.full([], 0x7F800001, tl.int64) * V  # above every key of a finite p
    # Empty intervals (lo == hi == k_x) where a side has no window: the searches then return k_x, which
    # selects nothing on that side.
    _up_lo, up = _search(k_x, tl.where(n_up > 0, top, k_x), n_up, row_ptr, urow_ptr, stride_v, ustride_v,
                         cfg_scale, temperature, V, row_max, inv_sum, threshold, k_x, 2, HAS_UNCOND, APPLY_TEMP,
                         DT, BLOCK_S, NPIV, LOG2_NPIV)
    dn, _dn_hi = _search(tl.where(n_dn > 0, 0, k_x).to(tl.int64), k_x, n_dn, row_ptr, urow_ptr, stride_v,
                         ustride_v, cfg_scale, temperature, V, row_max, inv_sum, threshold, k_x, 3, HAS_UNCOND,
                         APPLY_TEMP, DT, BLOCK_S, NPIV, LOG2_NPIV)
    n = tl.full([], 0, tl.int32)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        _, s = _scores(row_ptr, urow_ptr, offs, mask, stride_v, ustride_v, cfg_scale, temperature,
                       HAS_UNCOND, APPLY_TEMP, DT)
        key = _p_key(_prob(s, row_max, inv_sum, threshold), offs, V)
        win = mask & (((key > k_x) & (key <= up)) | ((key >= dn) & (key < k_x)))
        pos = n + tl.cumsum(win.to(tl.int32), axis=0) - 1
        tl.store(ids_row + pos, offs.to(tl.int64), mask=win & (pos < BLOCK_G))  # never more, by construction
        n += tl.sum(win.to(tl.int32), axis=0)
    tl.debug_barrier()  # the ids written above are read back by other threads of this program
    g = tl.arange(0, BLOCK_G)
    ids = tl.load(ids_row + g, mask=g < n, other=0)
    p_y = _p_at(row_ptr, urow_ptr, ids, g < n, stride_v, ustride_v, cfg_scale, temperature, row_max, inv_sum,
                threshold, HAS_UNCOND, APPLY_TEMP, DT)
    member = (g < n) & (tl.abs(p_y - p_x) < delta_p)
    if HAS_EMB:  # only image tokens group, and only with image tokens
        rx = x - emb_off
        in_x = (rx >= 0) & (rx < emb_rows)
        ry = ids - emb_off
        member = member & in_x & (ry >= 0) & (ry < emb_rows)
        if FINITE_D:
            dist = tl.zeros([BLOCK_G], dtype=EMB_DT)
            for d0 in range(0, emb_dim, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                dm = d < emb_dim
                e_x = tl.load(emb_ptr + tl.where(in_x, rx, 0) * s_er + d * s_ed, mask=dm & in_x, other=0.0)
                e_y = tl.load(emb_ptr + tl.where(member, ry, 0)[:, None] * s_er + d[None, :] * s_ed,
                              mask=member[:, None] & dm[None, :], other=0.0)
                diff = e_y.to(EMB_DT) - e_x.to(EMB_DT)[None, :]
                dist += tl.sum(diff * diff, axis=1)
            member = member & (dist < d_max)
    p_sum = tl.sum(tl.where(member, p_y, 0.0), axis=0)
    q_sum = p_sum.to(RATIO_DT)  # unused without q (one-hot q: q(group) = 1)
    if HAS_Q:
        q_sum = tl.sum(tl.load(q_row + tl.where(member, ids, 0) * s_qv, mask=member, other=0.0).to(RATIO_DT), axis=0)
    return p_sum, q_sum


# Integer arguments that may be 1 would otherwise be specialised into constants (and recompiled per value).
