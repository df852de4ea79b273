"""The decoding loop's verification step on the fused kernels (``mmspec.decode(..., kernels=...)``).

On CUDA with Triton (or when forced with ``kernels="triton"`` / ``MMSPEC_KERNELS=triton``) the loop hands the
raw target logits [B, K+1, V] to one fused step instead of ``LogitsPipeline.probs`` + ``mmspec.verify``. The
random draws are the ones ``verify`` makes, from the same generator in the same order (``u`` [B, K], then
``E`` [B, V]), so the streams stay aligned with the torch path; the p rows may differ in the last bits (see
``triton_verify``), so sampled tokens agree except at a near-tie and follow the same distribution.

Not fused (the loop keeps its torch path): logits processors (transformers ``LogitsProcessorList`` entries
such as a repetition penalty are arbitrary Python over the token history), and criteria other than
``exact``, ``lantern`` and ``gsd`` when sampling.
"""

from __future__ import annotations

import torch

from .. import acceptance as _acceptance
from ..drafting.base import Proposer
from ..sampling import per_row
from ..verify import VerifyResult, _pack, _row, invalid_rows, num_drafts
from .dispatch import resolve_backend, verify_from_logits
from .request import draw_noise, fusable

__all__ = ["FusedVerifier", "fused_verifier"]


class FusedVerifier:
    """Callable ``(drafts [B, K], draft_probs [B, K, V] or None, logits [B, K+1, V], generator) ->
    (VerifyResult, target_rows)``, the loop's verify step.

    ``target_rows`` is what proposers get in ``update``: the raw logits for greedy decoding (as the torch path
    passes the processed scores), the p rows [B, K+1, V] when sampling and the proposer reads them, else None.
    """

    def __init__(self, pipeline, criterion, greedy: bool, need_rows: bool):
        self.pipeline, self.criterion, self.greedy, self.need_rows = pipeline, criterion, greedy, need_rows

    def __call__(self, drafts, draft_probs, logits, generator):
        B, K = drafts.shape
        p = self.pipeline
        # Rows proposing fewer than K drafts pad them with -1 (see ``mmspec.verify``). The kernels verify full
        # windows, so they get a placeholder there; a row that accepts all its own drafts then takes the bonus
        # draw from the row after them (same E), exactly what ``verify`` emits.
        own = num_drafts(drafts)  # [B]
        fed = drafts.clamp_min(0)
        if self.greedy:
            out = verify_from_logits(fed, None, logits, greedy=True, backend="triton")
            rows = logits
            bonus = _row(logits, own).argmax(-1)
        else:
            counts = own.cpu() if per_row(generator) else None
            u, E = draw_noise(B, K, logits.shape[-1], generator, logits.device, counts)
            out = verify_from_logits(fed, draft_probs, logits, temperature=p.temperature, top_k=p.top_k,
                                     top_p=p.top_p, u=u, E=E, criterion=self.criterion,
                                     return_probs=self.need_rows, backend="triton")
            rows = out.target_probs
            bonus = (p.probs(_row(logits, own)).to(torch.float64) / E).argmax(-1)
        cut = (out.num_accepted >= own) & (own < K)
        num_accepted = torch.minimum(out.num_accepted, own)
        next_token = torch.where(cut, bonus, out.next_token)
        accepted = torch.arange(K, device=drafts.device) < num_accepted.unsqueeze(1)
        # Rows that cannot be sampled, judged on the raw logits (the pipeline keeps at least one token of a row
        # with a finite maximum): as the torch path, flagged here and raised by the loop after its one sync.
        invalid = invalid_rows(drafts, None if self.greedy else draft_probs, logits, num_accepted, greedy=True)
        if not self.greedy:
            used = torch.arange(K + 1, device=logits.device) <= num_accepted.unsqueeze(1)
            posinf = (logits.isposinf().any(-1) & used).any(-1)  # softmax of +inf is NaN
            invalid = torch.where(posinf & (invalid == 0), 1, invalid)
        result = VerifyResult(num_accepted, _pack(drafts, num_accepted, next_token), next_token, accepted, invalid)
        return result, rows


def fused_verifier(kernels: str, pipeline, criterion, proposer: Proposer, device) -> FusedVerifier | None:
    """The fused step for this decode, or None where the loop keeps its torch path.

    Args:
        kernels: ``"auto"`` (Triton for CUDA tensors when it imports, honouring ``MMSPEC_KERNELS``), ``"triton"``
            (force; on the CPU only under ``TRITON_INTERPRET=1``) or ``"torch"``.
        pipeline: the loop's ``LogitsPipeline``; with processors there is no fused step (see module docstring).
        criterion: the acceptance criterion (name or object); unfusable ones keep the torch path when sampling.
        proposer: the drafter; the p rows are written only when its ``update`` may read them.
        device: where the logits live.
    """
    if resolve_backend(kernels, device) != "triton" or pipeline.processors:
        return None
    greedy = not pipeline.do_sample
    if not greedy and not fusable(criterion):
        return None
    crit = _acceptance.get(criterion)
    if greedy and type(crit).greedy_accept is not _acceptance.Criterion.greedy_accept:  # e.g. greedy LANTERN
        return None
    need_rows = type(proposer).update is not Proposer.update
    return FusedVerifier(pipeline, criterion, greedy, need_rows)
