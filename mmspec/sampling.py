"""The logits pipeline and exact sampling helpers.

One pipeline turns raw model scores into the distribution used for both the target rows ``p`` and the
draft rows ``q`` (docs/algorithms.md section 6): logits processors (guidance and structural forcing arrive here
as processors from the model adapter, user processors after them) -> temperature -> top-k -> top-p ->
softmax. Using the same object for ``p`` and ``q`` is what keeps exact acceptance exact.

Every random draw takes a ``generator`` that is either one ``torch.Generator`` for the whole batch or a
list with one generator per row, so a row can be reproduced on its own. For that, a row must consume the same
draws alone as in any batch: draws over a window take ``counts`` [B], the slots each row really uses (its own
window, never the batch's widest), and with per-row generators row ``b`` draws only ``counts[b]`` slots. The
unused slots hold a constant that callers never read. (With one shared generator ``counts`` is ignored: the
whole tensor is drawn, as rows are not reproducible alone then anyway.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Union

import torch

Generator = Union[torch.Generator, Sequence[torch.Generator], None]  # noqa: UP007 (a runtime alias, py3.10-safe)

__all__ = [
    "LogitsPipeline",
    "Generator",
    "uniform",
    "exponential",
    "sample_from_weights",
    "sample_categorical",
    "onehot",
    "per_row",
]


def _check_generator(generator: Generator, batch: int) -> None:
    if isinstance(generator, (list, tuple)) and len(generator) != batch:
        raise ValueError(
            f"`generator` is a list of {len(generator)} generators but the batch has {batch} rows; "
            "pass one torch.Generator, or exactly one per row."
        )


def _draw(shape: Sequence[int], generator: Generator, device, fill: Callable[[torch.Tensor, object], None],
          counts=None):
    """Allocate float64 ``shape`` and fill it from ``generator`` (row-wise if it is a list; then row ``b`` draws
    only its first ``counts[b]`` slots along dim 1 when ``counts`` is given, the rest is 0.5)."""
    if isinstance(generator, (list, tuple)):
        _check_generator(generator, shape[0])
        counts = None if counts is None else torch.as_tensor(counts).tolist()
        rows = []
        for b, g in enumerate(generator):
            t = torch.empty(tuple(shape[1:]), dtype=torch.float64, device=g.device)
            if counts is None:
                fill(t, g)
            else:
                t.fill_(0.5)
                if counts[b] > 0:
                    fill(t[: counts[b]], g)
            rows.append(t)
        if not rows:
            return torch.empty(tuple(shape), dtype=torch.float64, device=device)
        if len({t.device for t in rows}) == 1:  # CPU generators for CUDA rows: one copy, not one per row
            return torch.stack(rows).to(device)
        return torch.stack([t.to(device) for t in rows])
    gen_device = generator.device if generator is not None else device
    t = torch.empty(tuple(shape), dtype=torch.float64, device=gen_device)
    fill(t, generator)
    return t.to(device)


def uniform(shape: Sequence[int], generator: Generator = None, device=None, counts=None) -> torch.Tensor:
    """Uniform draws in (0, 1], float64, so that ``u <= ratio`` accepts ratio 1 always and ratio 0 never.

    ``counts`` [B] (optional): with per-row generators, row ``b`` draws only its first ``counts[b]`` slots of dim 1.
    """
    return 1.0 - _draw(shape, generator, device, lambda t, g: t.uniform_(0.0, 1.0, generator=g), counts)


def exponential(shape: Sequence[int], generator: Generator = None, device=None, counts=None) -> torch.Tensor:
    """Exp(1) draws in float64, clamped away from 0 so ``w / E`` is never ``0 / 0`` (``counts`` as ``uniform``)."""
    e = _draw(shape, generator, device, lambda t, g: t.exponential_(1.0, generator=g), counts)
    return e.clamp_min_(torch.finfo(torch.float64).tiny)


def sample_from_weights(weights: torch.Tensor, generator: Generator = None, counts=None) -> torch.Tensor:
    """Exact draw from ``weights / weights.sum(-1)`` without normalising: ``argmax(w / E)``, ``E ~ Exp(1)``.

    ``mmspec.verify`` draws its residual token this way (one [B, V] draw per step) because the fused kernels take
    the same ``E`` (``mmspec.kernels.request.draw_noise``); larger draws use :func:`sample_categorical`.

    Args:
        weights: [..., V] non-negative, not necessarily normalised; every row must have positive mass.
        generator: one generator, or one per leading (batch) row.
        counts: optional [B] for weights [B, L, V]: with per-row generators row ``b`` draws only for its first
            ``counts[b]`` slots (its own window); the tokens of the other slots are arbitrary.
    Returns:
        LongTensor [...] of token ids in ``[0, V)``.
    """
    e = exponential(weights.shape, generator, weights.device, counts)
    return (weights.to(torch.float64) / e).argmax(-1)


def sample_categorical(weights: torch.Tensor, generator: Generator = None, counts=None) -> torch.Tensor:
    """Exact draw from ``weights / weights.sum(-1)`` by inverting the cumulative sum with one uniform per slot.

    The same distribution as :func:`sample_from_weights` from V times fewer random numbers: the choice for the
    large draws (a Jacobi window's [B, L, V] rows), where generating ``L * V`` exponentials on the host -- the usual
    case, as seeds are CPU generators -- costs more than the model's forward on a GPU. Zero-weight tokens are never
    drawn. Arguments and result as :func:`sample_from_weights` (``counts``: per-row generators draw only each
    row's first ``counts[b]`` slots; the tokens of the other slots are arbitrary).
    """
    w = weights.to(torch.float64)
    cdf = w.cumsum(-1)
    u = 1.0 - uniform(w.shape[:-1], generator, w.device, counts)  # [0, 1)
    total = cdf[..., -1:].contiguous()
    idx = torch.searchsorted(cdf, u.unsqueeze(-1) * total, right=True)  # first slot whose mass exceeds u * total
    # u * total can round up to total (rare): the last token of positive weight (the first slot where the cumulative
    # sum reaches the total) bounds the draw -- no host sync, no zero-weight token
    return torch.minimum(idx, torch.searchsorted(cdf, total)).squeeze(-1)


def per_row(generator: Generator) -> bool:
    """True when ``generator`` is a list with one generator per row (rows are then reproducible alone)."""
    return isinstance(generator, (list, tuple))


def onehot(tokens: torch.Tensor, vocab_size: int, dtype=torch.float32) -> torch.Tensor:
    """[...] ids -> [..., V] one-hot rows (the ``q`` of a deterministic draft)."""
    out = torch.zeros(*tokens.shape, vocab_size, dtype=dtype, device=tokens.device)
    return out.scatter_(-1, tokens.unsqueeze(-1), 1.0)


@dataclass
class LogitsPipeline:
    """Scores -> probabilities, identically for target and draft rows.

    Args:
        do_sample: False means greedy; ``__call__`` then is not needed and ``greedy_tokens`` is used.
        temperature: > 0; applied before top-k/top-p, as transformers does.
        top_k: keep the ``top_k`` highest scores (ties with the k-th are kept), None or 0 to disable.
        top_p: nucleus threshold in (0, 1], None to disable.
        processors: callables ``(input_ids [N, T], scores [N, V]) -> scores`` such as a transformers
            ``LogitsProcessorList``; they see the prefix that each scored position continues.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    processors: Sequence[Callable] = field(default_factory=tuple)

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            raise ValueError(f"`temperature` must be a positive number, got {self.temperature!r}.")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"`top_k` must be a non-negative int or None, got {self.top_k!r}.")
        if self.top_p is not None and not (0.0 < float(self.top_p) <= 1.0):
            raise ValueError(f"`top_p` must be in (0, 1] or None, got {self.top_p!r}.")
        self.processors = tuple(self.processors or ())

    # -- scores ------------------------------------------------------------------------------------
    def process(self, scores: torch.Tensor, tokens: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                window: torch.Tensor | None = None, first: int = 0, tree=None) -> torch.Tensor:
        """Apply the logits processors to scores [B, L, V].

        Position ``j`` of row ``b`` is scored with exactly the ids plain decoding would pass:
        ``tokens[b, :lengths[b]]`` (the left-padded prompt and the committed tokens) followed by
        ``window[b, :first + j]`` (the drafts before it). Rows and positions whose prefixes have equal length are
        processed together, so processors must not hold per-row state sized to the batch.

        Args:
            tokens: [B, S] committed ids in absolute layout (prompt of length T, then new tokens).
            lengths: [B] end of each row's committed ids in ``tokens``.
            window: [B, first + L - 1] drafts fed after the committed ids.
            first: number of drafts before the first scored position.
            tree: a ``mmspec.tree.DraftTree`` instead of ``window``: scores [B, N + 1, V] are the block
                ``[anchor, nodes]`` and each node continues the tokens on its own path.
        """
        if not self.processors:
            return scores
        if tree is not None and tokens is not None and lengths is not None:
            from .tree import block_paths

            paths, depth = block_paths(tree)  # [B, L, D], [B, L]
            return self._process_paths(scores, tokens, lengths, paths.cpu(), depth.cpu())
        if tokens is None or lengths is None:
            raise ValueError("logits processors need the committed tokens and their lengths.")
        B, L, _ = scores.shape
        # a chain: position j continues the first ``first + j`` drafts of the same window
        window = torch.empty(B, 0, dtype=torch.long) if window is None else window.cpu()
        counts = (first + torch.arange(L)).expand(B, L)
        return self._process_paths(scores, tokens, lengths, window.unsqueeze(1).expand(B, L, -1), counts)

    def _process_paths(self, scores, tokens, lengths, paths, counts):
        """``process`` where position ``j`` of row ``b`` continues ``paths[b, j, :counts[b, j]]``."""
        dev = scores.device
        lengths = lengths.to("cpu")
        tokens = tokens.to(dev)
        out = scores.clone()
        total = lengths.unsqueeze(1) + counts
        for size in total.unique().tolist():
            rows, cols = (total == size).nonzero(as_tuple=True)
            ids = torch.empty(len(rows), size, dtype=torch.long, device=dev)
            for i, (b, j) in enumerate(zip(rows.tolist(), cols.tolist())):
                n = int(lengths[b])
                ids[i, :n] = tokens[b, :n]
                ids[i, n:] = paths[b, j, : size - n].to(dev)
            s = scores[rows.to(dev), cols.to(dev)]
            for proc in self.processors:
                s = proc(ids, s)
            out[rows.to(dev), cols.to(dev)] = s
        return out

    def greedy_tokens(self, scores: torch.Tensor) -> torch.Tensor:
        """[..., V] processed scores -> [...] argmax ids (what greedy decoding emits)."""
        return scores.argmax(-1)

    def probs(self, scores: torch.Tensor) -> torch.Tensor:
        """[..., V] processed scores -> [..., V] probabilities after temperature, top-k and top-p.

        Computed in float32 at least (float64 stays float64).
        """
        dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
        logits = scores.to(dtype)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        V = logits.shape[-1]
        if self.top_k and self.top_k < V:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            remove_sorted = cum <= (1.0 - self.top_p)
            remove_sorted[..., -1] = False  # always keep the most likely token
            remove = remove_sorted.scatter(-1, order, remove_sorted)
            logits = logits.masked_fill(remove, float("-inf"))
        return logits.softmax(-1)
