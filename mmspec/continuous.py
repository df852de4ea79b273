"""The decoding loop for continuous tokens (MAR-style models with a diffusion head).

    prefill -> repeat { draft K tokens -> one target forward -> verify -> commit, roll back } -> output

The same loop as :func:`mmspec.decoding.decode`, with continuous tokens: a draft model proposes K tokens, each
from its own diffusion chain started from trajectory noise drawn once per token; the target conditions all K+1
positions in one transformer forward and runs its own chains from the same noise; the continuous criterion
(:mod:`mmspec.acceptance.continuous`, which documents why the output is exactly the target's) accepts a
prefix per row; both models' caches roll back to it. Rows accept different numbers of drafts and simply sit
at different cache lengths (:class:`mmspec.models.mar.MARRunner`). Host-side bookkeeping (committed counts)
is updated from one device -> host copy per step. ``GenerationStats`` counts tokens as in the token loop: the
prefill forward emits the first token, so ``step_compression`` of plain AR is exactly 1.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from .acceptance.continuous import get_continuous, normal, verify_continuous
from .decoding import GenerationStats
from .models.mar import DDPMTrajectory, MARRunner

__all__ = ["decode_continuous"]


def _check_trajectories(target_traj, draft_traj):
    for name, t in (("trajectory", target_traj), ("draft_trajectory", draft_traj)):
        if t is not None and not isinstance(t, DDPMTrajectory):
            raise TypeError(f"`{name}` must be a mmspec.models.mar.DDPMTrajectory, got {type(t).__name__}.")


@torch.no_grad()
def decode_continuous(
    target: MARRunner,
    class_labels: torch.Tensor,
    *,
    trajectory: DDPMTrajectory,
    draft: MARRunner | None = None,
    draft_trajectory: DDPMTrajectory | None = None,
    window: int = 4,
    criterion="continuous",
    generator=None,
    align: bool = True,
    progress: bool = False,
    callback=None,
) -> tuple[torch.Tensor, GenerationStats, dict]:
    """Generate ``target.num_tokens`` continuous tokens per row, speculatively when a ``draft`` is given.

    Args:
        target: the target adapter (``MARRunner``), with its guidance scale.
        class_labels: LongTensor [B].
        trajectory: the target's token sampler (steps, temperature).
        draft: the draft adapter (same token dimension), or None for plain autoregressive decoding.
        draft_trajectory: the draft's sampler (default: ``trajectory``). Equal last-step scales use the
            reflection residual; different ones use bounded rejection sampling.
        window: tokens per target forward (1 anchor + up to ``window - 1`` drafts).
        criterion: ``"continuous"`` or a ``ContinuousCriterion``.
        generator: a ``torch.Generator`` or one per row; every random draw (trajectory noise, acceptance,
            residual) comes from it.
        align: share the trajectory noise between draft and target (trajectory alignment). False gives the
            draft independent noise: still exact, lower acceptance (for comparison).
        callback: ``callback(step, tokens [B, N, C], num_new [B])`` after every commit.

    Returns:
        tokens [B, N, C] (float32), ``GenerationStats``, and a dict with ``proposed`` / ``accepted`` draft counts
        (the measured acceptance rate is their ratio) and the last-step scales.
    """
    if not isinstance(target, MARRunner) or (draft is not None and not isinstance(draft, MARRunner)):
        raise TypeError("`target` and `draft` must be mmspec.models.mar.MARRunner adapters.")
    _check_trajectories(trajectory, draft_trajectory)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"`window` must be an int >= 1, got {window!r}.")
    if draft is not None and draft.token_dim != target.token_dim:
        raise ValueError(f"draft tokens have {draft.token_dim} channels, the target's {target.token_dim}.")
    if draft is not None and draft.num_tokens != target.num_tokens:
        raise ValueError(f"the draft makes {draft.num_tokens} tokens per sample, the target {target.num_tokens}.")
    class_labels = torch.as_tensor(class_labels).reshape(-1).long()
    crit = get_continuous(criterion)
    draft_trajectory = draft_trajectory or trajectory
    if draft is None:
        window = 1

    t0 = time.perf_counter()
    B, N, C = class_labels.shape[0], target.num_tokens, target.token_dim
    dev = target.device
    steps = max(trajectory.num_steps, draft_trajectory.num_steps) + 1
    s_p, s_q = trajectory.last_scale, draft_trajectory.last_scale
    tokens = torch.zeros(B, N, C, dtype=torch.float64, device=dev)
    num_new = torch.zeros(B, dtype=torch.long)
    row_forwards = torch.zeros(B, dtype=torch.long)
    stats = GenerationStats(accepted_histogram=[0] * window)
    counts = {"proposed": 0, "accepted": 0}
    bar = tqdm(total=N, disable=not progress, desc="tokens", leave=False)

    def target_means(z, noise):
        """z [B, L, G, D], noise [B, L, steps, C] -> mu_p [B, L, C] (float64)."""
        L = z.shape[1]
        fn = target.eps_fn(z.flatten(0, 1))
        return trajectory.last_mean(fn, noise.flatten(0, 1)).view(B, L, C)

    # prefill: the first token is a plain draw from the target
    z0 = target.prefill(class_labels.to(dev))
    stats.target_forwards += 1
    row_forwards += 1
    noise = normal((B, 1, steps, C), generator, dev)
    tokens[:, 0] = target_means(z0.unsqueeze(1), noise)[:, 0] + s_p * noise[:, 0, -1]
    num_new += 1
    anchor = tokens[:, 0]
    if draft is not None:
        draft.prefill(class_labels.to(dev))
        stats.draft_forwards += 1
        draft_fed = torch.zeros(B, dtype=torch.long)  # committed tokens the draft has seen
    if callback is not None:
        callback(0, tokens.float(), num_new.clone())
    bar.update(1)

    while bool((num_new < N).any()):
        active = num_new < N
        remaining = torch.where(active, N - num_new, 0)
        K = max(0, min(window - 1, int(remaining.max()) - 1))
        real = torch.where(active, (remaining - 1).clamp(min=0, max=K), 0)  # real drafts per row [B]
        noise = normal((B, K + 1, steps, C), generator, dev)
        draft_noise = normal((B, K + 1, steps, C), generator, dev) if (K and not align) else noise

        drafts = torch.zeros(B, K, C, dtype=torch.float64, device=dev)
        mu_q = torch.zeros(B, K, C, dtype=torch.float64, device=dev)
        if K:
            # feed the committed tokens the draft has not seen (1, or 2 after a full acceptance), then draft
            draft.checkpoint()
            pending = torch.where(active, num_new - draft_fed, 0)
            P = int(pending.max())
            idx = (draft_fed.view(B, 1) + torch.arange(P)).clamp(max=N - 1).to(dev)
            block = tokens.gather(1, idx.unsqueeze(-1).expand(B, P, C))
            valid = torch.arange(P) < pending.view(B, 1)
            zq = draft.forward(block, valid)
            last = (pending - 1).clamp(min=0).to(dev)
            z = zq[torch.arange(B, device=dev), last]  # [B, G, D]: condition of the first draft
            stats.draft_forwards += 1
            for j in range(K):
                if j:
                    z = draft.forward(drafts[:, j - 1 : j], (j < real).view(B, 1))[:, 0]
                    stats.draft_forwards += 1
                mu_q[:, j] = draft_trajectory.last_mean(draft.eps_fn(z), draft_noise[:, j])
                drafts[:, j] = mu_q[:, j] + s_q * draft_noise[:, j, -1]

        block = torch.cat([anchor.unsqueeze(1), drafts], dim=1)
        valid = active.view(B, 1) & (torch.arange(K + 1) <= real.view(B, 1))
        target.checkpoint()
        zp = target.forward(block, valid)
        stats.target_forwards += 1
        row_forwards += active
        mu_p = target_means(zp, noise)
        result = verify_continuous(drafts, draft_noise[:, :K, -1], mu_q, s_q, mu_p, s_p, noise[:, :, -1], crit,
                                   generator, num_drafts=real.to(dev))
        num_accepted = result.num_accepted.cpu()  # the one device -> host sync of the step
        count = torch.where(active, torch.minimum(num_accepted + 1, remaining), 0)
        rows, cols = (torch.arange(K + 1) < count.view(B, 1)).nonzero(as_tuple=True)
        tokens[rows.to(dev), (num_new[rows] + cols).to(dev)] = result.tokens[rows.to(dev), cols.to(dev)]
        for k in num_accepted[active].tolist():
            stats.accepted_histogram[k] += 1
        counts["proposed"] += int(real.sum())
        counts["accepted"] += int(num_accepted[active].sum())
        before = int(num_new.max())
        num_new += count
        target.rollback(torch.where(active, num_accepted + 1, 0))
        if K:
            draft.rollback(torch.where(active, pending + torch.minimum(num_accepted, real - 1).clamp(min=0), 0))
            draft_fed = torch.where(active, draft_fed + pending + torch.minimum(num_accepted, (real - 1).clamp(min=0)),
                                    draft_fed)
        anchor = result.next_token
        bar.update(int(num_new.max()) - before)
        if callback is not None:
            callback(stats.target_forwards - 1, tokens.float(), num_new.clone())

    bar.close()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    stats.new_tokens_per_row = num_new.tolist()
    stats.new_tokens = int(num_new.sum())
    stats.row_forwards = row_forwards.tolist()
    stats.wall_time = time.perf_counter() - t0
    info = dict(counts, acceptance_rate=counts["accepted"] / counts["proposed"] if counts["proposed"] else None,
                target_scale=s_p, draft_scale=s_q, criterion=repr(crit))
    return tokens.float(), stats, info
