"""The shared verification core: one vectorised accept/reject step for a batch of draft windows.

Every method in mmspec (Jacobi, draft model, prompt lookup, plain AR with an empty window) ends each step
here. The step is plain tensor code over [B, K]: no Python loop over positions, no host sync, every random
draw from the caller's generator(s).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import acceptance as _acceptance
from .sampling import Generator, per_row, sample_categorical, sample_from_weights, uniform
from .tree import DraftTree, sibling_rank

__all__ = ["verify", "verify_tree", "VerifyResult", "TreeVerifyResult", "speculative_redraw", "InvalidDistributionError",
           "check_rows"]


class InvalidDistributionError(ValueError):
    """A target row with no valid distribution (no allowed token, NaN or inf), or a draft its own q excludes."""


#: codes of ``VerifyResult.invalid``: what is wrong with a row (0: nothing)
INVALID_REASONS = {
    1: "the target's distribution has no allowed token or is not finite (all scores -inf, all-zero, NaN or inf "
       "probabilities); check the logits processors (e.g. no_repeat_ngram_size or bad_words_ids can exclude "
       "every token of a small vocabulary), temperature, top_k and top_p, and the model's logits",
    2: "a draft has probability 0 (or NaN) under the q row it was drawn from: the proposer's `draft_probs` do "
       "not belong to its drafts",
}


def check_rows(invalid: torch.Tensor, active: torch.Tensor | None = None) -> None:
    """Raise ``InvalidDistributionError`` if any (active) row of ``invalid`` [B] (CPU codes, see
    ``VerifyResult.invalid``) is flagged; the message names the rows and the cause."""
    if not bool(invalid.any()):
        return
    bad = invalid if active is None else torch.where(active, invalid, 0)
    if bool((bad > 0).any()):
        rows = (bad > 0).nonzero().flatten().tolist()
        reasons = "; ".join(INVALID_REASONS[c] for c in sorted(set(bad[bad > 0].tolist())))
        raise InvalidDistributionError(f"cannot sample rows {rows}: {reasons}.")


def compute_dtype(*rows: torch.Tensor | None) -> torch.dtype:
    """float64 if any of ``rows`` is float64, else float32: verification never computes in half precision."""
    return torch.float64 if any(r is not None and r.dtype == torch.float64 for r in rows) else torch.float32


@dataclass
class VerifyResult:
    """Outcome of one verification step.

    Attributes:
        num_accepted: LongTensor [B], accepted drafts per row (0..K).
        tokens: LongTensor [B, K+1]: the accepted drafts, then the correction (or bonus) token, then -1.
        next_token: LongTensor [B], the correction token at a rejection, or the bonus token when all K
            drafts were accepted; it equals ``tokens[b, num_accepted[b]]``.
        accepted: BoolTensor [B, K], True on the accepted prefix.
        invalid: LongTensor [B] (device), 0 for a valid row, else a code of ``INVALID_REASONS`` (a row whose
            distribution cannot be sampled); None where it was not computed. ``check_rows`` raises on it.
    """

    num_accepted: torch.Tensor
    tokens: torch.Tensor
    next_token: torch.Tensor
    accepted: torch.Tensor
    invalid: torch.Tensor | None = None

    @property
    def num_emitted(self) -> torch.Tensor:
        """LongTensor [B]: tokens this step adds per row (accepted drafts + 1)."""
        return self.num_accepted + 1


def take_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [B, L, ...], index [B, M] -> t[b, index[b, m]] of shape [B, M, ...]: whole rows by indexing (a copy per
    row), which on the CPU is several times faster than a gather over an expanded [B, M, V] index."""
    return t[torch.arange(t.shape[0], device=t.device).unsqueeze(1), index]


def _row(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [B, L, ...], index [B] -> t[b, index[b]] of shape [B, ...]."""
    return take_rows(t, index.view(-1, 1)).squeeze(1)


def _pack(draft_tokens, num_accepted, next_token):
    """[B, K] drafts, [B] counts, [B] next tokens -> [B, K+1]: the accepted drafts, the next token, then -1."""
    B, K = draft_tokens.shape
    if K == 0:  # plain AR
        return next_token.unsqueeze(1)
    pos = torch.arange(K + 1, device=draft_tokens.device)
    n = num_accepted.unsqueeze(1)
    padded = torch.cat([draft_tokens, next_token.unsqueeze(1)], dim=1).masked_fill_(pos > n, -1)
    return padded.scatter_(1, n, next_token.unsqueeze(1))


def verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    criterion="exact",
    generator: Generator = None,
    *,
    greedy: bool = False,
    check: bool = True,
) -> VerifyResult:
    """Verify K draft tokens per row against the target in one vectorised step.

    Args:
        draft_tokens: LongTensor [B, K], the drafts ``x_1..x_K`` (K may be 0: plain AR). A row may propose
            fewer than K drafts: its unused slots hold -1, after its drafts. Such a row verifies its own drafts
            only; when it accepts all of them its next token is the bonus draw from ``p`` right after them, so a
            row gives the same result as with a window of its own (and, with per-row generators, draws only for
            its own slots).
        draft_probs: [B, K, V] rows ``q_i`` the drafts were drawn from, or None for deterministic drafts
            (one-hot ``q``: prompt lookup, greedy drafters, fresh Jacobi init tokens).
        target_probs: [B, K+1, V] target rows ``p_1..p_{K+1}`` after the logits pipeline. With
            ``greedy=True`` any scores whose argmax is the greedy token will do (e.g. processed logits).
        criterion: a registry name or a ``mmspec.acceptance.Criterion``.
        generator: a ``torch.Generator`` or a list with one per row; every draw comes from it.
        greedy: accept iff ``x_i == argmax p_i`` and emit ``argmax p``; no randomness is consumed.
        check: raise ``InvalidDistributionError`` when a row it used cannot be sampled (a target row with no
            allowed token, NaN or inf; a draft with ``q(x) = 0``). That costs one host sync; the decoding loop
            passes False and checks ``VerifyResult.invalid`` with the copy of the tokens it makes anyway.

    Returns:
        VerifyResult with ``num_accepted`` [B], ``tokens`` [B, K+1] (-1 padded), ``next_token`` [B] and
        ``invalid`` [B].

    Probabilities are promoted to float32 (float64 stays float64) before any arithmetic, whatever comes in.

    The criterion gives the acceptance probability ``a_i``; ``u_i ~ U(0, 1]`` in float64 accepts iff
    ``u_i <= a_i``, left to right, stopping at the first rejection. At a rejection the emitted token is an
    exact draw from the criterion's residual (falling back to ``p`` where the residual has no mass, so
    ``p == q`` never divides by zero); with all K accepted it is a bonus draw from ``p_{K+1}``.
    """
    if draft_tokens.dim() != 2:
        raise ValueError(f"`draft_tokens` must be [B, K], got shape {tuple(draft_tokens.shape)}.")
    B, K = draft_tokens.shape
    if target_probs.dim() != 3 or target_probs.shape[:2] != (B, K + 1):
        raise ValueError(
            f"`target_probs` must be [B, K+1, V] = [{B}, {K + 1}, V], got shape {tuple(target_probs.shape)}."
        )
    if draft_probs is not None and draft_probs.shape != (B, K, target_probs.shape[-1]):
        raise ValueError(
            f"`draft_probs` must be None or [B, K, V] = {(B, K, target_probs.shape[-1])}, "
            f"got shape {tuple(draft_probs.shape)}."
        )

    if greedy and K == 0:  # plain AR: the argmax; the row is flagged when its maximum is -inf (nothing allowed) or NaN
        top, next_token = target_probs[:, 0].max(-1)
        accepted, num_accepted = draft_tokens.bool(), torch.zeros_like(next_token)
        invalid = torch.where(top > float("-inf"), 0, 1)
    elif greedy:
        accepted, num_accepted, next_token, best = greedy_step(
            draft_tokens, target_probs, _acceptance.get(criterion), with_scores=True)
        invalid = invalid_rows(draft_tokens, None, target_probs, num_accepted, greedy=True, best=best)
    else:
        dtype = compute_dtype(target_probs, draft_probs)
        target_probs = target_probs.to(dtype)
        draft_probs = None if draft_probs is None else draft_probs.to(dtype)
        # Per-row generators draw for each row's own drafts only (one host read of the counts, per-row mode only).
        counts = num_drafts(draft_tokens).cpu() if per_row(generator) else None
        accepted, num_accepted, next_token = sampled_step(
            draft_tokens, draft_probs, target_probs, _acceptance.get(criterion),
            lambda shape: uniform(shape, generator, draft_tokens.device, counts),
            lambda weights: sample_from_weights(weights, generator),
        )
        invalid = invalid_rows(draft_tokens, draft_probs, target_probs, num_accepted)
    if check:
        check_rows(invalid.cpu())
    return VerifyResult(num_accepted, _pack(draft_tokens, num_accepted, next_token), next_token, accepted, invalid)


def num_drafts(draft_tokens: torch.Tensor) -> torch.Tensor:
    """[B, K] drafts, -1 after each row's own -> LongTensor [B]: the drafts each row proposes."""
    return (draft_tokens >= 0).long().cumprod(-1).sum(-1)


def invalid_rows(draft_tokens, draft_probs, target_rows, num_accepted, greedy: bool = False,
                 best: torch.Tensor | None = None) -> torch.Tensor:
    """LongTensor [B] of ``INVALID_REASONS`` codes for the rows this step used (positions ``0..num_accepted``
    of the target, the drafts up to the first rejection); no host sync.

    ``target_rows`` are probabilities [B, K+1, V], or scores when ``greedy`` (then a row is invalid when no
    score is above -inf, or one is NaN); ``best`` [B, K+1] may pass the greedy rows' maxima already computed.
    """
    K1 = target_rows.shape[1]
    if greedy:  # the maximum propagates NaN, and is -inf when nothing is allowed
        best = target_rows.amax(-1) if best is None else best
        bad_p = ~(best > float("-inf"))
    else:
        bad_p = ~torch.isfinite(target_rows).all(-1) | ~(target_rows.sum(-1) > 0) | (target_rows < 0).any(-1)
    if K1 == 1:  # plain AR: the one row is used
        invalid = bad_p[:, 0].long()
    else:
        used = torch.arange(K1, device=target_rows.device) <= num_accepted.unsqueeze(1)  # [B, K+1]
        invalid = (bad_p & used).any(-1).long()
    if draft_probs is not None and draft_tokens.shape[1]:
        K = draft_tokens.shape[1]
        q_x = draft_probs.gather(-1, draft_tokens.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # [B, K]
        bad_q = ~(q_x > 0) & (draft_tokens >= 0) & used[:, :K]
        invalid = torch.where(bad_q.any(-1) & (invalid == 0), 2, invalid)
    return invalid


def greedy_step(draft_tokens: torch.Tensor, scores: torch.Tensor, criterion=None, with_scores: bool = False):
    """Greedy verification: [B, K] drafts, [B, K+1, V] scores -> (accepted [B, K], num_accepted [B],
    next_token [B]): accept iff ``x_i == argmax`` (or the criterion's ``greedy_accept``, e.g. greedy LANTERN),
    emit the argmax (first index on ties). Drafts of -1 end a row's window. ``with_scores=True`` also returns
    the maximum score per position [B, K+1] (NaN where a row has a NaN)."""
    K = draft_tokens.shape[1]
    top, best = scores.max(-1)  # [B, K+1]
    if K == 0:  # plain AR
        next_token = best[:, 0]
        out = draft_tokens.new_zeros(draft_tokens.shape, dtype=torch.bool), torch.zeros_like(next_token), next_token
        return (*out, top) if with_scores else out
    if criterion is None or type(criterion).greedy_accept is _acceptance.Criterion.greedy_accept:
        passed = draft_tokens == best[:, :K]
    else:
        passed = criterion.greedy_accept(draft_tokens.clamp_min(0), scores[:, :K]) & (draft_tokens >= 0)
    accepted = passed.long().cumprod(-1).bool()
    num_accepted = accepted.sum(-1)
    next_token = best.gather(1, num_accepted.unsqueeze(1)).squeeze(1)
    return (accepted, num_accepted, next_token, top) if with_scores else (accepted, num_accepted, next_token)


def sampled_step(draft_tokens, draft_probs, target_probs, criterion, draw_uniform, draw_token):
    """The sampled verification step with its two random draws supplied by the caller.

    ``draw_uniform((B, K))`` gives float64 uniforms in (0, 1] (drawn after nothing else, so a generator's
    stream is consumed as ``u`` then the token draw); ``draw_token(weights [B, V])`` gives an exact draw
    [B] from unnormalised weights. ``verify`` passes generator draws; ``mmspec.kernels`` passes fixed noise
    tensors. Drafts of -1 end a row's window (see ``verify``). Returns ``(accepted [B, K], num_accepted [B],
    next_token [B])``.
    """
    K = draft_tokens.shape[1]
    own = draft_tokens >= 0  # [B, K]: the row's own drafts (a prefix)
    tokens = draft_tokens.clamp_min(0)
    ratio = criterion.acceptance(tokens, draft_probs, target_probs[:, :K])  # [B, K]
    u = draw_uniform(tuple(draft_tokens.shape))
    accepted = ((u <= ratio.to(torch.float64)) & own).long().cumprod(-1).bool()
    num_accepted = accepted.sum(-1)

    p_n = _row(target_probs, num_accepted)  # [B, V]: residual row at the rejection, or the bonus row
    if K > 0:
        at = num_accepted.clamp(max=K - 1)
        x_n = _row(tokens, at)
        q_n = None if draft_probs is None else _row(draft_probs, at)
        weights = criterion.residual(x_n, q_n, p_n)
        empty = weights.sum(-1, keepdim=True) <= 0
        rejected = (num_accepted < num_drafts(draft_tokens)).unsqueeze(1)
        weights = torch.where(rejected & ~empty, weights, p_n)
    else:
        weights = p_n
    return accepted, num_accepted, draw_token(weights)


@dataclass
class TreeVerifyResult(VerifyResult):
    """Outcome of verifying a ``DraftTree``: ``VerifyResult`` for the accepted root-to-leaf path, plus

    Attributes:
        path: LongTensor [B, depth]: node indices of the accepted path in depth order, then -1.
        accepted: BoolTensor [B, N]: True on the nodes of the accepted path (it replaces the chain's prefix mask).
    """

    path: torch.Tensor = None


def verify_tree(
    tree: DraftTree,
    target_probs: torch.Tensor,
    criterion="exact",
    generator: Generator = None,
    *,
    greedy: bool = False,
) -> TreeVerifyResult:
    """Verify a token tree per row exactly, by recursive rejection sampling over the siblings of each node.

    Args:
        tree: the ``DraftTree`` (N nodes per row).
        target_probs: [B, N + 1, V] the target rows: row 0 for the children of the anchor, row ``i + 1`` for the
            children of node ``i``. With ``greedy=True`` any scores with the right argmax will do.
        criterion, generator: as in ``verify``; relaxed criteria apply per candidate.
        greedy: accept the child equal to ``argmax p`` (the first such sibling), emit ``argmax p`` at the end.

    Returns:
        ``TreeVerifyResult``: ``num_accepted`` [B] (the path's depth), ``tokens`` [B, depth + 1] (the path, then the
        correction or bonus token, then -1), ``next_token`` [B], ``path`` [B, depth], ``accepted`` [B, N].

    For the children ``c_1..c_w`` of a node, with ``r`` its target row: ``c_j`` is accepted with the criterion's
    probability for ``(c_j, q_j, r)``; if it is rejected, ``r`` becomes the normalised residual (the old ``r`` where
    the residual is empty) and the next sibling is tested; the first accepted child is descended into and later
    siblings are not consulted. Where no child is accepted, one token is drawn from ``r``. This is exact for any
    ``q_j`` that is the distribution ``c_j`` was drawn from given ``c_1..c_{j-1}`` (ALGORITHMS, token trees).

    The test of each node depends only on its parent's row and its earlier siblings, not on the path above, so all
    nodes are tested at once, one sibling rank at a time (``tree.width`` vectorised steps over [B, N + 1, V]); the
    path is then followed by pointer doubling (about log2 ``tree.depth`` rounds over [B, N]). Randomness: one
    float64 uniform per node (per-row generators: up to the row's last used node) and one token draw per row,
    whatever is accepted.
    """
    tokens, parents = tree.tokens, tree.parents
    B, N = tokens.shape
    if target_probs.dim() != 3 or target_probs.shape[:2] != (B, N + 1):
        raise ValueError(f"`target_probs` must be [B, N+1, V] = [{B}, {N + 1}, V], got {tuple(target_probs.shape)}.")
    V, dev = target_probs.shape[-1], tokens.device
    valid = tree.valid.to(dev)
    W = max(tree.width, 1)
    rank = sibling_rank(parents, valid)  # [B, N]
    # child[b, a, j]: the node that is the j-th child of block position a (0 = anchor), or N (none).
    slot = torch.where(valid & (rank < W), (parents + 1) * W + rank, (N + 1) * W)
    child = torch.full((B, (N + 1) * W + 1), N, dtype=torch.long, device=dev)
    child.scatter_(1, slot, torch.arange(N, device=dev).expand(B, N))
    child = child[:, :-1].view(B, N + 1, W)
    tokens_ext = torch.cat([tokens, tokens.new_zeros(B, 1)], dim=1)  # index N: no child

    chosen = torch.zeros(B, N + 1, dtype=torch.bool, device=dev)  # per node (index N is a sink)
    if greedy:
        best = target_probs.argmax(-1)  # [B, N + 1]
        done = torch.zeros(B, N + 1, dtype=torch.bool, device=dev)
        for j in range(W):
            c = child[:, :, j]
            ok = (c < N) & ~done & (tokens_ext.gather(1, c) == best)
            chosen.scatter_(1, torch.where(ok, c, N), ok)
            done |= ok
    else:
        crit = _acceptance.get(criterion)
        dtype = torch.float64 if target_probs.dtype == torch.float64 else torch.float32
        r = target_probs.to(dtype)  # [B, N + 1, V], the running residual of every node's row
        # per-row generators: a row draws up to its last used node only, as it would alone (mmspec.sampling)
        used = torch.where(tree.valid, torch.arange(1, N + 1), 0).amax(-1) if per_row(generator) and N else None
        u = torch.cat([uniform((B, N), generator, dev, used), torch.ones(B, 1, dtype=torch.float64, device=dev)], 1)
        probs_ext = None if tree.probs is None else torch.cat([tree.probs, tree.probs.new_zeros(B, 1, V)], 1)
        done = torch.zeros(B, N + 1, dtype=torch.bool, device=dev)
        for j in range(W):
            c = child[:, :, j]  # [B, N + 1]
            has = c < N
            x = tokens_ext.gather(1, c)
            q = None if probs_ext is None else take_rows(probs_ext, c).to(dtype)
            a = crit.acceptance(x, q, r).to(torch.float64)
            ok = has & ~done & (u.gather(1, c) <= a)
            chosen.scatter_(1, torch.where(ok, c, N), ok)
            done |= ok
            w = crit.residual(x.flatten(), None if q is None else q.flatten(0, 1), r.flatten(0, 1)).view(B, N + 1, V)
            mass = w.sum(-1, keepdim=True)
            r = torch.where(has.unsqueeze(-1) & ~done.unsqueeze(-1) & (mass > 0), w / mass.clamp_min(1e-300), r)
    chosen = chosen[:, :N] & valid

    # The accepted path: chosen nodes whose ancestors are all chosen. Pointer doubling: after k rounds ``ok`` says
    # whether a node and its 2^k - 1 nearest ancestors are chosen and ``up`` points 2^k levels up (the anchor, N,
    # is a chosen sink that points to itself), so ceil(log2(depth)) rounds of two gathers follow the whole path.
    ok = torch.cat([chosen, chosen.new_ones(B, 1)], 1)
    up = torch.cat([torch.where(parents < 0, N, parents), parents.new_full((B, 1), N)], 1)
    for _ in range(max(tree.depth - 1, 0).bit_length()):
        ok = ok & ok.gather(1, up)
        up = up.gather(1, up)
    on_path = ok[:, :N]
    num_accepted = on_path.sum(-1)
    node = torch.arange(N, device=dev).expand(B, N)
    end = torch.where(on_path, node + 1, 0).amax(-1) if N else torch.zeros(B, dtype=torch.long, device=dev)
    if greedy:
        next_token = best.gather(1, end.unsqueeze(1)).squeeze(1)
    else:
        next_token = sample_from_weights(_row(r, end), generator)
    D = tree.depth
    order = torch.where(on_path, node, N).sort(-1).values[:, :D]  # path nodes in depth order, N padded
    path = torch.where(order < N, order, -1)
    path_tokens = tokens_ext.gather(1, order.clamp(max=N))
    out = _pack(path_tokens, num_accepted, next_token)
    return TreeVerifyResult(num_accepted, out, next_token, on_path, path=path)


def speculative_redraw(
    old_tokens: torch.Tensor,
    old_probs: torch.Tensor | None,
    new_probs: torch.Tensor,
    generator: Generator = None,
    counts=None,
) -> torch.Tensor:
    """Coupled redraw of every slot independently: a draw from ``new_probs`` that keeps ``old_tokens``
    as often as possible.

    Keeps ``x`` with probability ``min(1, p(x)/q(x))``, else draws from ``max(p - q, 0)`` (or ``p`` when
    that is empty). The marginal of the result is exactly ``p`` whatever ``q`` was, so the result can be
    verified as a draft drawn from ``p``. Shapes: [B, L], [B, L, V] or None (one-hot), [B, L, V] -> [B, L].
    ``counts`` [B]: the slots each row uses (per-row generators draw only those; see ``mmspec.sampling``).
    Slots holding -1 (no old draft) are drawn from ``new_probs``.
    """
    exact = _acceptance.get("exact")
    dtype = compute_dtype(new_probs, old_probs)
    new_probs = new_probs.to(dtype)
    old_probs = None if old_probs is None else old_probs.to(dtype)
    tokens = old_tokens.clamp_min(0)
    keep = uniform(old_tokens.shape, generator, old_tokens.device, counts) <= exact.acceptance(
        tokens, old_probs, new_probs
    ).to(torch.float64)
    weights = exact.residual(tokens, old_probs, new_probs)
    weights = torch.where(weights.sum(-1, keepdim=True) > 0, weights, new_probs)
    keep &= old_tokens >= 0
    return torch.where(keep, old_tokens, sample_categorical(weights, generator, counts))
