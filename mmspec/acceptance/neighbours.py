"""Latent-neighbour tables for the relaxed visual-token criteria (``lantern``, ``gsd``).

Conventions shared by every helper here:

* A codebook (or an embedding slice) is a float matrix ``[N, D]`` whose row ``i`` describes the image
  token ``image_token_offset + i``; tokens outside ``[offset, offset + N)`` (text, specials) are not
  image tokens and have no neighbours.
* A neighbour table holds *token ids* (the offset already added), int64, ``-1`` for "no neighbour".
  Rows are sorted by increasing squared Euclidean distance; a token is never its own neighbour
  (excluded by index, so duplicated codebook entries still count as neighbours of each other).

Building a table never materialises the ``N x N`` distance matrix: rows are processed in blocks of at
most ``max_chunk_elements`` distances (default 2**24, i.e. 64 MiB of float32), so a 65k-entry codebook
costs a few hundred MiB at most (the table itself) instead of 16 GiB.
"""

from __future__ import annotations

import torch

__all__ = ["as_matrix", "image_neighbours", "codebook_neighbours", "rows_for_tokens"]

DEFAULT_CHUNK_ELEMENTS = 2**24


def as_matrix(obj, name: str = "codebook") -> torch.Tensor:
    """A detached 2-D float tensor from a tensor, a Parameter or a module with ``.weight`` (nn.Embedding)."""
    if hasattr(obj, "weight") and not isinstance(obj, torch.Tensor):
        obj = obj.weight
    if not isinstance(obj, torch.Tensor):
        obj = torch.as_tensor(obj)
    obj = obj.detach()
    if obj.dim() != 2 or obj.shape[0] < 1:
        raise ValueError(f"`{name}` must be a 2-D [N, D] matrix with N >= 1, got shape {tuple(obj.shape)}.")
    if not obj.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point matrix, got dtype {obj.dtype}.")
    return obj


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def image_neighbours(
    codebook,
    k: int,
    image_token_offset: int = 0,
    *,
    chunk_size: int | None = None,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """The ``k`` nearest codebook entries of every image token, as token ids.

    Args:
        codebook: ``[N, D]`` VQ codebook (tensor or ``nn.Embedding``); row ``i`` is token ``offset + i``.
        k: neighbours per token; the result has ``min(k, N - 1)`` columns.
        image_token_offset: id of the token of codebook row 0.
        chunk_size: rows per block (default: as many as fit ``max_chunk_elements`` distances).
        max_chunk_elements: memory bound of one block of the distance computation.

    Returns:
        LongTensor ``[N, min(k, N - 1)]`` on the codebook's device: row ``i`` lists the neighbours of token
        ``offset + i`` (token ids), nearest first, self excluded. Ties between exactly equal distances are
        broken by ``torch.topk`` (unspecified order).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be an int >= 1, got {k!r}.")
    cb = as_matrix(codebook)
    cb = cb.to(_compute_dtype(cb))
    N = cb.shape[0]
    width = min(k, N - 1)
    out = torch.empty(N, width, dtype=torch.long, device=cb.device)
    if width == 0:
        return out
    if chunk_size is None:
        chunk_size = max(1, int(max_chunk_elements) // N)
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size!r}.")
    sq = (cb * cb).sum(-1)
    for start in range(0, N, chunk_size):
        block = cb[start : start + chunk_size]
        r = block.shape[0]
        # ||a||^2 + ||b||^2 - 2 a.b: one [r, N] block at a time.
        dist = torch.addmm(sq[start : start + r, None] + sq[None, :], block, cb.T, alpha=-2.0)
        rows = torch.arange(r, device=cb.device)
        dist[rows, rows + start] = float("inf")  # self, by index
        out[start : start + r] = dist.topk(width, dim=-1, largest=False, sorted=True).indices
    return out + int(image_token_offset)


def codebook_neighbours(
    codebook,
    k: int,
    image_token_offset: int = 0,
    vocab_size: int | None = None,
    *,
    chunk_size: int | None = None,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """The full-vocabulary neighbour table ``[V, min(k, N - 1)]``: image rows as ``image_neighbours``,
    every other row (text tokens, specials) all ``-1``.

    ``V = vocab_size`` (default ``image_token_offset + N``). Prefer ``image_neighbours`` plus an offset
    for joint vocabularies where ``V >> N``: the criteria accept either form.
    """
    cb = as_matrix(codebook)
    N = cb.shape[0]
    offset = int(image_token_offset)
    if offset < 0:
        raise ValueError(f"`image_token_offset` must be >= 0, got {image_token_offset!r}.")
    V = offset + N if vocab_size is None else int(vocab_size)
    if V < offset + N:
        raise ValueError(
            f"`vocab_size`={vocab_size} is smaller than image_token_offset + codebook size = {offset + N}."
        )
    img = image_neighbours(cb, k, offset, chunk_size=chunk_size, max_chunk_elements=max_chunk_elements)
    table = torch.full((V, img.shape[1]), -1, dtype=torch.long, device=img.device)
    table[offset : offset + N] = img
    return table


def rows_for_tokens(tokens: torch.Tensor, row_offset: int, num_rows: int):
    """Map token ids to rows of a table describing tokens ``[row_offset, row_offset + num_rows)``.

    Returns ``(rows, inside)``: ``rows`` clamped into range (safe to index with), ``inside`` the mask of
    tokens that the table actually describes.
    """
    rel = tokens - row_offset
    inside = (rel >= 0) & (rel < num_rows)
    return rel.clamp(0, max(num_rows - 1, 0)), inside
