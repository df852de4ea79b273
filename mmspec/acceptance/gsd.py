"""Grouped speculative decoding (GSD, So et al. 2025): accept a draft on the mass of its token group.

Lossy and opt-in. For a draft ``x`` with target row ``p`` and draft row ``q`` (one-hot for deterministic
drafts):

* rank all tokens by ``p`` (descending; equal probabilities by ascending id, so the order is total and
  deterministic on every device);
* the rank window: the ``G = group_size`` consecutive ranks around ``x`` -- ``(G - 1) // 2`` ranks above it,
  ``G // 2`` below, clipped at the ends of the ranking (``x`` included);
* the group: ``x`` plus the window tokens ``y`` with ``|p(y) - p(x)| < delta_p`` and squared Euclidean
  embedding distance ``||e(y) - e(x)||^2 < d_max`` (image tokens only);
* accept with ``min(1, p(group) / q(group))``; on rejection emit from ``max(p - q, 0)`` (the ordinary residual).

``group_size = 1`` (or ``delta_p = 0``) is exactly ``exact``. The output is not ``p``: the mass inside an
accepted group follows ``q``, and groups overlap; with a deterministic draft the emitted distribution is
``modified_target("gsd", x, p)`` whose TV from ``p`` is ``min(1, p(group)) - p(x)``. Acceptance is monotone
in ``group_size``, ``delta_p`` and ``d_max`` for deterministic drafts; with sampled drafts a larger group can
also lower the ratio (it adds ``q`` mass too).

Defaults, and how they differ from the published code: mmspec uses ``group_size=25`` (the low end of the
paper's 25..50), ``delta_p=0.15`` (as the code) and no distance bound (``d_max=inf``, so no embeddings are
needed). The published code runs ``group_size=14``, ``delta_p=0.15``, ``d_max=0.5`` over the language model's
input embeddings; pass ``GSD(group_size=14, delta_p=0.15, d_max=0.5, embeddings=model.get_input_embeddings())``
for that (the image pipeline keeps embeddings given here and re-slices them at its image-token offset; a
criterion without embeddings gets the VQ codebook from the pipeline). Measured on the zoo text-to-image model
(``mmspec.bench.image.run`` on 16 held-out captions, Jacobi window 16 random init, seeds 0..15, guidance 3):
step compression 1.65 exact SJD, 2.10 these defaults, 1.97 the reference settings; classifier
adherence 22.9 / 37.5 / 25.0 % and Frechet 360 / 362 / 387 (16 images: noisy, no quality loss seen). There
``d_max=0.5`` never binds: 99.9996 % of the image-token embedding pairs lie within squared distance 0.5 (max
0.51, median 0.24), so the reference settings equal ``group_size=14`` alone; on real models the scale of the
embeddings decides, so choose ``d_max`` from their distances.

Vectorisation and memory (why no sort and no distance table):

* The window is found without sorting the vocabulary. Each token gets one int64 key,
  ``bits(float32 p) * V + (V - 1 - id)``, whose order is exactly "higher p, then lower id" (IEEE bit
  patterns of non-negative floats are ordered like the floats). The ``(G - 1) // 2`` tokens just above
  ``x`` are the smallest keys greater than ``key(x)``, the ``G // 2`` just below the largest keys smaller
  than it: two ``topk`` calls with ``k ~ G / 2`` over ``[rows, V]``, O(V log G) per row instead of a full
  O(V log V) sort, and no ``[rows, V]`` index tensor kept around.
* The embedding distance is needed only for the ``G - 1`` window members, so it is computed exactly on the
  fly from the gathered embeddings (``[rows, G - 1, D]``). This avoids both an ``N x N`` distance matrix
  (rebuilt every call in the published code; 16 GiB for a 65k codebook) and a top-M neighbour table that
  would silently drop group members beyond M.
* Rows are processed in chunks so that one chunk holds at most ``max_chunk_elements`` (default 2**24)
  entries of ``[rows, V]`` and of ``[rows, G - 1, D]``: peak extra memory is a few hundred MiB whatever
  ``B * K`` and ``V`` are (int64 keys, one masked copy, a float32 copy of ``p``; or the gathered float32
  embedding differences). With ``V = 65536`` a chunk is 256 rows (fewer when ``(G - 1) * D > V``); on CPU,
  512 rows x 65536 tokens with G = 50 and D = 4096 bf16 embeddings peaked at +170 MiB. The loop is over
  row chunks only (sizes known on the host, no sync), never over positions or tokens.
"""

from __future__ import annotations

import math

import torch

from .base import Criterion, gather_token_probs, register
from .exact import Exact
from .lantern import _check_float, _check_int
from .neighbours import DEFAULT_CHUNK_ELEMENTS, as_matrix, rows_for_tokens

__all__ = ["GSD"]

_I64_MAX = torch.iinfo(torch.int64).max
_I64_MIN = torch.iinfo(torch.int64).min


@register("gsd")
class GSD(Criterion):
    """Grouped speculative decoding acceptance.

    Args:
        group_size: ``G``, the rank-window size including ``x`` (paper: 25..50; the published code uses 14).
        delta_p: probability closeness, ``|p(y) - p(x)| < delta_p`` (code: 0.15); ``0`` disables grouping.
        d_max: squared-L2 embedding distance bound ``d(x, y) < d_max``; ``math.inf`` (default) drops the
            distance test. A finite ``d_max`` needs embeddings.
        embeddings: the model's input embeddings ``[V_e, D]`` indexed by token id (tensor or
            ``nn.Embedding``); image tokens are ids ``[image_token_offset, image_token_offset +
            num_image_tokens)`` (default: up to ``V_e``).
        image_token_offset: id of the first image token.
        vocab_size: the target's vocabulary size (checked; optional).
        codebook: alternatively a VQ codebook ``[N, D]`` whose row ``i`` is token ``image_token_offset + i``
            (used when no ``embeddings`` are given).
        num_image_tokens: number of image tokens (slices ``embeddings``).
        max_chunk_elements: memory bound per row chunk, see the module docstring.

    Only image tokens are grouped once embeddings (or a codebook) are known; text tokens are verified
    exactly. Without any embeddings (and ``d_max = inf``) every token can be grouped.
    """

    lossless = False
    requires_sampling = True

    def __init__(
        self,
        group_size: int = 25,
        delta_p: float = 0.15,
        d_max: float = math.inf,
        embeddings=None,
        image_token_offset: int = 0,
        vocab_size: int | None = None,
        *,
        codebook=None,
        num_image_tokens: int | None = None,
        max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ):
        self.group_size = _check_int("group_size", group_size, 1)
        self.delta_p = _check_float("delta_p", delta_p, 0.0)
        self.d_max = _check_float("d_max", d_max, 0.0)
        self.image_token_offset = _check_int("image_token_offset", image_token_offset, 0)
        self.vocab_size = None if vocab_size is None else _check_int("vocab_size", vocab_size, 1)
        self._max_chunk_elements = _check_int("max_chunk_elements", max_chunk_elements, 1)
        self._emb = None  # [N, D] rows of the image tokens [image_token_offset, image_token_offset + N)
        self._on_device = {}
        self._exact = Exact()
        self._given = None  # (embeddings, codebook, num_image_tokens) from the user: what prepare() never replaces
        if embeddings is not None or codebook is not None:
            self._given = (embeddings, codebook, num_image_tokens)
            self._set_embeddings(embeddings, codebook, num_image_tokens)

    def prepare(self, embeddings=None, codebook=None, image_token_offset=None, vocab_size=None,
                num_image_tokens=None, **context):
        """Take the token embeddings (``embeddings`` by token id, else ``codebook`` by code index) and the
        image-token range from the model. Cheap: nothing but a reference is stored; other keys are ignored.

        Embeddings (or a codebook) given to the constructor are the user's choice of space for ``d_max`` and
        win over a ``codebook`` a pipeline passes here; they are sliced again for the image-token range
        given here (``embeddings`` are indexed by token id, so a new ``image_token_offset`` moves the slice).
        ``embeddings=`` passed here replaces everything."""
        if image_token_offset is not None:
            self.image_token_offset = _check_int("image_token_offset", image_token_offset, 0)
        if vocab_size is not None:
            self.vocab_size = _check_int("vocab_size", vocab_size, 1)
        if embeddings is not None:
            self._given = (embeddings, None, num_image_tokens)
        if self._given is not None:
            given_emb, given_cb, given_n = self._given
            self._set_embeddings(given_emb, given_cb, given_n if num_image_tokens is None else num_image_tokens)
        elif codebook is not None:
            self._set_embeddings(None, codebook, num_image_tokens)
        return self

    def _set_embeddings(self, embeddings, codebook, num_image_tokens):
        off = self.image_token_offset
        if embeddings is not None:
            emb = as_matrix(embeddings, "embeddings")
            if num_image_tokens is None:
                stop = emb.shape[0]
            else:
                stop = off + _check_int("num_image_tokens", num_image_tokens, 1)
            if not off < stop <= emb.shape[0]:
                raise ValueError(
                    f"image tokens [{off}, {stop}) do not fit the {emb.shape[0]} rows of `embeddings`."
                )
            emb = emb[off:stop]
        else:
            emb = as_matrix(codebook, "codebook")
            if num_image_tokens is not None:
                emb = emb[: _check_int("num_image_tokens", num_image_tokens, 1)]
        if self.vocab_size is not None and off + emb.shape[0] > self.vocab_size:
            raise ValueError(f"image tokens [{off}, {off + emb.shape[0]}) exceed vocab_size={self.vocab_size}.")
        self._emb = emb
        self._on_device = {emb.device: emb}

    def _emb_on(self, device):
        emb = self._on_device.get(device)
        if emb is None:
            emb = self._on_device[device] = self._emb.to(device)
        return emb

    # -- groups ----------------------------------------------------------------------------------------
    def _window(self, x, p):
        """x [R], p [R, V] -> (ids [R, G-1], valid [R, G-1]): the rank window of x, x itself excluded."""
        R, V = p.shape
        n_up = min((self.group_size - 1) // 2, V - 1)
        n_dn = min(self.group_size // 2, V - 1)
        key = (p.to(torch.float32) + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into 0.0
        key.mul_(V).add_(V - 1 - torch.arange(V, device=p.device))
        k_x = key.gather(-1, x.unsqueeze(-1))
        ids, valid = [], []
        if n_up > 0:
            above = torch.where(key > k_x, key, torch.full((), _I64_MAX, device=p.device))
            v, i = above.topk(n_up, dim=-1, largest=False, sorted=True)
            del above
            ids.append(i)
            valid.append(v != _I64_MAX)
        if n_dn > 0:
            below = torch.where(key < k_x, key, torch.full((), _I64_MIN, device=p.device))
            v, i = below.topk(n_dn, dim=-1, largest=True, sorted=True)
            del below
            ids.append(i)
            valid.append(v != _I64_MIN)
        if not ids:
            empty = torch.empty(R, 0, dtype=torch.long, device=p.device)
            return empty, empty.bool()
        return torch.cat(ids, -1), torch.cat(valid, -1)

    def _members(self, x, p):
        """x [R], p [R, V] -> (window ids [R, G-1], member mask [R, G-1]) of x's group (x excluded)."""
        ids, member = self._window(x, p)
        if ids.shape[-1] == 0:
            return ids, member
        p_x = gather_token_probs(p, x).unsqueeze(-1)
        member = member & ((p.gather(-1, ids) - p_x).abs() < self.delta_p)
        if self._emb is not None:
            emb = self._emb_on(p.device)
            rx, in_x = rows_for_tokens(x, self.image_token_offset, emb.shape[0])
            ry, in_y = rows_for_tokens(ids, self.image_token_offset, emb.shape[0])
            member = member & in_x.unsqueeze(-1) & in_y
            if math.isfinite(self.d_max):
                dt = torch.float64 if emb.dtype == torch.float64 else torch.float32
                diff = emb[ry].to(dt) - emb[rx].to(dt).unsqueeze(1)  # [R, G-1, D]
                member = member & ((diff * diff).sum(-1) < self.d_max)
        elif math.isfinite(self.d_max):
            raise RuntimeError(
                "GSD with a finite `d_max` needs token embeddings: pass `embeddings=` (or `codebook=`) to the "
                "constructor or call `prepare(embeddings=..., image_token_offset=...)` before verifying."
            )
        return ids, member

    def _chunks(self, R, V):
        per_row = max(V, (self.group_size - 1) * (self._emb.shape[1] if self._emb is not None else 1))
        rows = max(1, self._max_chunk_elements // max(per_row, 1))
        return [(s, min(s + rows, R)) for s in range(0, R, rows)]

    def group(self, draft_tokens: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
        """The group of each draft: [...] ids, [..., V] rows -> LongTensor [..., G] of token ids, ``x``
        first, then the window members (above ``x`` nearest first, then below), ``-1`` for non-members."""
        V = target_probs.shape[-1]
        x = draft_tokens.reshape(-1)
        p = target_probs.reshape(-1, V)
        out = []
        for s, e in self._chunks(x.shape[0], V):
            ids, member = self._members(x[s:e], p[s:e])
            out.append(torch.cat([x[s:e].unsqueeze(-1), torch.where(member, ids, -1)], -1))
        if not out:
            return torch.empty(*draft_tokens.shape, 1 + 0, dtype=torch.long, device=draft_tokens.device)
        res = torch.cat(out, 0)
        return res.reshape(*draft_tokens.shape, res.shape[-1])

    def _group_mass(self, x, q, p):
        """x [R], q [R, V] or None, p [R, V] -> (p(group), q(group) or None), each [R]."""
        p_x = gather_token_probs(p, x)
        q_x = None if q is None else gather_token_probs(q, x)
        ids, member = self._members(x, p)
        if ids.shape[-1] == 0:
            return p_x, q_x
        zero = torch.zeros((), dtype=p.dtype, device=p.device)
        # x first, then + 0.0 where the group is {x}: bit-identical to exact in that case.
        p_g = p_x + torch.where(member, p.gather(-1, ids), zero).sum(-1)
        q_g = None if q is None else q_x + torch.where(member, q.gather(-1, ids), zero.to(q.dtype)).sum(-1)
        return p_g, q_g

    def acceptance(self, draft_tokens, draft_probs, target_probs):
        if self.group_size == 1 or self.delta_p == 0.0:
            return self._exact.acceptance(draft_tokens, draft_probs, target_probs)
        V = target_probs.shape[-1]
        x = draft_tokens.reshape(-1)
        p = target_probs.reshape(-1, V)
        q = None if draft_probs is None else draft_probs.reshape(-1, V)
        p_parts, q_parts = [], []
        for s, e in self._chunks(x.shape[0], V):
            p_g, q_g = self._group_mass(x[s:e], None if q is None else q[s:e], p[s:e])
            p_parts.append(p_g)
            q_parts.append(q_g)
        if not p_parts:
            return target_probs.new_empty(draft_tokens.shape)
        p_g = torch.cat(p_parts)
        if q is None:  # one-hot q: q(group) = 1
            a = p_g.clamp(0.0, 1.0)
        else:
            q_g = torch.cat(q_parts)
            a = (p_g / q_g.clamp_min(torch.finfo(q_g.dtype).tiny)).clamp(0.0, 1.0)
        return a.reshape(draft_tokens.shape)

    def residual(self, draft_tokens, draft_probs, target_probs):
        return self._exact.residual(draft_tokens, draft_probs, target_probs)
