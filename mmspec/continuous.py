"""Continuous tokens (MAR-style models with a diffusion head) through the one decoding loop.

    prefill -> repeat { draft K tokens -> one target forward -> verify -> commit -> roll back } -> output

``ContinuousState`` is ``mmspec.decoding.DecodeState`` with vectors instead of ids: the target's outputs are
conditions, turned into the Gaussian means of each token's last diffusion step by the target's own chains (started
from trajectory noise shared with the drafter), and verified by the continuous criterion
(``mmspec.acceptance.continuous``, which documents why the output is exactly the target's). Drafting is
``mmspec.drafting.ContinuousDraftProposer``; plain AR is ``NoDraft``. Rows accept different numbers of drafts and
simply sit at different cache lengths (``mmspec.models.mar.MARRunner``). ``GenerationStats`` counts tokens as for
ids: the prefill forward emits the first token, so ``step_compression`` of plain AR is exactly 1.
"""

from __future__ import annotations

import torch

from .acceptance import get as get_criterion
from .acceptance.continuous import normal, verify_continuous
from .decoding import GenerationStats, State, decode
from .drafting import make_proposer
from .models.mar import DDPMTrajectory, MARRunner

__all__ = ["ContinuousState", "decode_continuous"]


class ContinuousState(State):
    """Committed continuous tokens and per-row progress.

    Attributes:
        tokens: float64 [B, N, C] on ``device``: each row's committed tokens, zeros after them.
        num_new, active: LongTensor / BoolTensor [B] (CPU), as in ``DecodeState``.
        token_dim: C.
        trajectory: the target's token sampler (``DDPMTrajectory``: steps, temperature, last-step scale).
        prompt: ``(class_labels [B],)``, the target's prefill argument.
    """

    prompt_length = 0  # tokens has no prompt part
    greedy = False

    def __init__(self, class_labels: torch.Tensor, num_tokens: int, token_dim: int, trajectory: DDPMTrajectory,
                 generator, device):
        B = class_labels.shape[0]
        self.batch_size, self.max_new_tokens, self.token_dim = B, num_tokens, token_dim
        self.trajectory, self.generator, self.device = trajectory, generator, torch.device(device)
        self.prompt = (class_labels.to(device),)
        self.tokens = torch.zeros(B, num_tokens, token_dim, dtype=torch.float64, device=device)
        self.num_new = torch.zeros(B, dtype=torch.long)
        self.active = torch.full((B,), num_tokens > 0, dtype=torch.bool)

    def drafts_per_row(self, K: int) -> torch.Tensor:
        """LongTensor [B]: drafts of a K-draft step that fit each row's remaining tokens (0 for finished rows)."""
        return torch.where(self.active, (self.remaining - 1).clamp(min=0, max=K), 0)

    def no_drafts(self):
        return torch.zeros(self.batch_size, 0, self.token_dim, dtype=torch.float64, device=self.device)

    def block(self, drafts):
        K = drafts.shape[1]
        valid = self.active.view(-1, 1) & (torch.arange(K + 1) <= self.drafts_per_row(K).view(-1, 1))
        return torch.cat([self.anchor.unsqueeze(1), drafts], dim=1), valid  # [B, K+1, C], [B, K+1]

    def verifier(self, target, proposer, criterion, kernels):
        """The target's chains from the drafts' trajectory noise -> means ``mu_p`` -> ``verify_continuous``."""
        criterion = get_criterion(criterion, kind="continuous")
        traj, s_p, gen = self.trajectory, self.trajectory.last_scale, self.generator

        def step(drafts, q, z):  # [B, K, C], GaussianDrafts or None, conditions [B, K+1, G, D]
            B, L, C = self.batch_size, z.shape[1], self.token_dim
            noise = q.trajectory if q is not None else normal((B, L, traj.num_steps + 1, C), gen, self.device)
            mu_p = traj.last_mean(target.eps_fn(z.flatten(0, 1)), noise.flatten(0, 1)).view(B, L, C)
            if q is None:  # no drafter (the prefill, plain AR): K = 0
                return verify_continuous(drafts, drafts, drafts, s_p, mu_p, s_p, noise[:, :, -1], criterion,
                                         gen), mu_p
            return verify_continuous(drafts, q.noise, q.mean, q.scale, mu_p, s_p, noise[:, :, -1], criterion, gen,
                                     num_drafts=q.num_drafts), mu_p

        return step

    def commit(self, result):
        num_accepted = result.num_accepted.cpu()  # the one device -> host sync of the step
        B, L = result.tokens.shape[:2]
        count = torch.minimum(num_accepted + 1, self.remaining)  # 0 for finished rows
        rows, cols = (torch.arange(L) < count.view(B, 1)).nonzero(as_tuple=True)
        dev = self.device
        self.tokens[rows.to(dev), (self.num_new[rows] + cols).to(dev)] = result.tokens[rows.to(dev), cols.to(dev)]
        self.num_new += count
        self.active &= self.num_new < self.max_new_tokens
        self.anchor = result.next_token
        return num_accepted


def _check_trajectories(target_traj, draft_traj):
    for name, t in (("trajectory", target_traj), ("draft_trajectory", draft_traj)):
        if t is not None and not isinstance(t, DDPMTrajectory):
            raise TypeError(f"`{name}` must be a mmspec.models.mar.DDPMTrajectory, got {type(t).__name__}.")


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

    Builds a ``ContinuousState`` and the proposer and runs ``mmspec.decoding.decode``.

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
        callback: ``callback(step, state)`` after every commit (``state.tokens`` [B, N, C], ``state.num_new``).

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
    crit = get_criterion(criterion, kind="continuous")
    draft_trajectory = draft_trajectory or trajectory
    proposer, window = make_proposer("ar" if draft is None else "draft", window, kind="continuous", draft=draft,
                                     draft_trajectory=draft_trajectory, align=align)
    state = ContinuousState(class_labels, target.num_tokens, target.token_dim, trajectory, generator, target.device)
    state, stats = decode(target, proposer, state, window=window, criterion=crit, progress=progress,
                          callback=callback)
    proposed, accepted = getattr(proposer, "proposed", 0), getattr(proposer, "accepted", 0)
    info = dict(proposed=proposed, accepted=accepted, acceptance_rate=accepted / proposed if proposed else None,
                target_scale=trajectory.last_scale, draft_scale=draft_trajectory.last_scale, criterion=repr(crit))
    return state.tokens.float(), stats, info
