"""Image-token models: the layout of a generated image span and classifier-free guidance.

A token image model generates a span of ``height x width`` code tokens, optionally with an end-of-line
token after every row (Emu3, Lumina-mGPT) and an end-of-image token after the grid. ``ImageLayout`` knows
that structure; ``GuidedLM`` wraps a causal-LM adapter so that:

* conditional and unconditional rows run in one batched forward (``2B`` rows) and are rolled back together,
  so they can never diverge;
* logits are combined as ``u + s (c - u)`` (classifier-free guidance) and structural positions are forced
  (end-of-line / end-of-image become one-hot, image positions may only emit image tokens).

Both happen before temperature/top-k/top-p, for target and draft rows alike (docs/algorithms.md section 6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .causal_lm import CausalLM

__all__ = ["ImageLayout", "VideoLayout", "GuidedLM", "IMAGE", "EOL", "EOI", "AFTER", "EOF"]

IMAGE, EOL, EOI, AFTER = 0, 1, 2, 3
EOF = 4  # end-of-frame separator of a video span (VideoLayout only)


@dataclass(frozen=True)
class ImageLayout:
    """Where image tokens live in the vocabulary and how a generated image span is laid out.

    Attributes:
        height, width: the token grid.
        image_token_offset: vocabulary id of code 0.
        codebook_size: number of image codes (ids ``offset .. offset + codebook_size - 1``).
        eol_token_id: token forced after each grid row, or None.
        eoi_token_id: token forced after the grid, or None.
    """

    height: int
    width: int
    image_token_offset: int
    codebook_size: int
    eol_token_id: int | None = None
    eoi_token_id: int | None = None

    def __post_init__(self):
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image grid must be at least 1x1, got {self.height}x{self.width}.")

    @property
    def row_stride(self) -> int:
        """Tokens per generated row, the end-of-line token included."""
        return self.width + (self.eol_token_id is not None)

    @property
    def num_tokens(self) -> int:
        """Tokens in the whole generated span (grid, end-of-lines, end-of-image)."""
        return self.height * self.row_stride + (self.eoi_token_id is not None)

    @property
    def token_range(self) -> tuple[int, int]:
        return self.image_token_offset, self.image_token_offset + self.codebook_size

    def kind(self, index: torch.Tensor) -> torch.Tensor:
        """Kind (IMAGE, EOL, EOI, AFTER) of the token at new-token ``index`` (any shape, long)."""
        grid_end = self.height * self.row_stride
        col = index % self.row_stride
        kind = torch.where(col == self.width, EOL, IMAGE) if self.eol_token_id is not None else torch.zeros_like(index)
        kind = torch.where(index >= grid_end, EOI if self.eoi_token_id is not None else AFTER, kind)
        return torch.where(index >= self.num_tokens, AFTER, kind)

    def allowed(self, vocab_size: int, device=None) -> torch.Tensor:
        """BoolTensor [4, V]: which tokens each kind may emit (AFTER allows everything)."""
        allowed = torch.zeros(4, vocab_size, dtype=torch.bool, device=device)
        lo, hi = self.token_range
        allowed[IMAGE, lo:hi] = True
        if self.eol_token_id is not None:
            allowed[EOL, self.eol_token_id] = True
        if self.eoi_token_id is not None:
            allowed[EOI, self.eoi_token_id] = True
        allowed[AFTER] = True
        return allowed

    def forced_token(self, kind: torch.Tensor) -> torch.Tensor:
        """The structural token for EOL/EOI kinds, -1 elsewhere."""
        out = torch.full_like(kind, -1)
        if self.eol_token_id is not None:
            out = torch.where(kind == EOL, self.eol_token_id, out)
        if self.eoi_token_id is not None:
            out = torch.where(kind == EOI, self.eoi_token_id, out)
        return out

    def to_grid(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """Generated span [B, >= grid tokens] -> code indices [B, height * width] (structure removed)."""
        span = new_tokens[:, : self.height * self.row_stride].reshape(-1, self.height, self.row_stride)
        return (span[..., : self.width] - self.image_token_offset).reshape(-1, self.height * self.width)


@dataclass(frozen=True)
class VideoLayout(ImageLayout):
    """A generated video span: ``frames`` grids of ``height x width`` codes, one after the other.

    Each frame is laid out like an ``ImageLayout`` grid (optional end-of-line token after every row), then an
    optional end-of-frame separator ``eof_token_id``; an optional end-of-video token ``eoi_token_id`` follows
    the last frame. New-token index ``i`` is frame ``i // frame_stride``; the token at the same place in the
    previous frame is ``i - frame_stride``. Structural tokens are forced in every frame, so a speculative
    window may span frame borders.

    Attributes (besides ``ImageLayout``'s):
        frames: number of frames.
        eof_token_id: token forced after each frame, or None.
    """

    frames: int = 1
    eof_token_id: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.frames, bool) or not isinstance(self.frames, int) or self.frames < 1:
            raise ValueError(f"a video needs an int number of frames >= 1, got {self.frames!r}.")

    @property
    def frame_stride(self) -> int:
        """Tokens per generated frame, end-of-lines and the end-of-frame separator included."""
        return self.height * self.row_stride + (self.eof_token_id is not None)

    @property
    def num_tokens(self) -> int:
        """Tokens in the whole generated span (all frames and their structure, end-of-video)."""
        return self.frames * self.frame_stride + (self.eoi_token_id is not None)

    def kind(self, index: torch.Tensor) -> torch.Tensor:
        """Kind (IMAGE, EOL, EOF, EOI, AFTER) of the token at new-token ``index`` (any shape, long)."""
        within = index % self.frame_stride
        grid = self.height * self.row_stride
        kind = torch.zeros_like(index)
        if self.eol_token_id is not None:
            kind = torch.where((within % self.row_stride == self.width) & (within < grid), EOL, kind)
        if self.eof_token_id is not None:
            kind = torch.where(within == grid, EOF, kind)
        frames_end = self.frames * self.frame_stride
        kind = torch.where(index >= frames_end, EOI if self.eoi_token_id is not None else AFTER, kind)
        return torch.where(index >= self.num_tokens, AFTER, kind)

    def allowed(self, vocab_size: int, device=None) -> torch.Tensor:
        """BoolTensor [5, V]: which tokens each kind (IMAGE, EOL, EOI, AFTER, EOF) may emit."""
        allowed = torch.cat([super().allowed(vocab_size, device),
                             torch.zeros(1, vocab_size, dtype=torch.bool, device=device)])
        if self.eof_token_id is not None:
            allowed[EOF, self.eof_token_id] = True
        return allowed

    def forced_token(self, kind: torch.Tensor) -> torch.Tensor:
        """The structural token for EOL/EOF/EOI kinds, -1 elsewhere."""
        out = super().forced_token(kind)
        if self.eof_token_id is not None:
            out = torch.where(kind == EOF, self.eof_token_id, out)
        return out

    def to_frames(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """Generated span [B, >= frames * frame_stride] -> codes [B, frames, height * width] (structure removed)."""
        span = new_tokens[:, : self.frames * self.frame_stride].reshape(-1, self.frames, self.frame_stride)
        grid = span[..., : self.height * self.row_stride].reshape(-1, self.frames, self.height, self.row_stride)
        return (grid[..., : self.width] - self.image_token_offset).reshape(-1, self.frames, self.height * self.width)

    def to_grid(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """Generated span -> codes [B, frames * height * width] (frame-major, then row-major)."""
        return self.to_frames(new_tokens).flatten(1)


class GuidedLM:
    """A causal-LM adapter with classifier-free guidance and structural forcing for an image span.

    Args:
        model: a transformers causal LM (or any model with its calling convention), or a ``CausalLM``.
        layout: the ``ImageLayout`` of the generated span (the span starts right after the prompt).
        guidance_scale: ``s`` in ``u + s (c - u)``; 1.0 (or no unconditional prompt) runs cond rows only.
        adapter: the inner adapter class (``CausalLM`` by default; families with quirks pass their own).

    ``prefill(input_ids, attention_mask, uncond_input_ids=..., uncond_attention_mask=..., **kwargs)`` takes the
    conditional prompts [B, T] and the unconditional ones [B, T'] (both left padded). Keyword arguments
    starting with ``uncond_`` go to the unconditional rows, the others to the conditional rows.
    """

    def __init__(self, model, layout: ImageLayout, guidance_scale: float = 1.0, adapter=CausalLM):
        self.inner = model if hasattr(model, "prefill") else adapter(model)
        self.layout, self.guidance_scale = layout, float(guidance_scale)
        self.vocab_size = self.inner.vocab_size
        lo, hi = layout.token_range
        if lo < 0 or hi > self.vocab_size:
            raise ValueError(f"image tokens [{lo}, {hi}) do not fit the model's vocabulary of {self.vocab_size}.")
        self._allowed = None
        self.guided = False

    @property
    def device(self):
        return self.inner.device

    def _combine(self, logits: torch.Tensor, new_index: torch.Tensor) -> torch.Tensor:
        """[2B or B, L, V] raw logits, [B, L] new-token indices -> [B, L, V] guided, forced scores."""
        logits = logits.float() if logits.dtype not in (torch.float32, torch.float64) else logits
        if self.guided:
            cond, uncond = logits.chunk(2, dim=0)
            logits = uncond + self.guidance_scale * (cond - uncond)
        if self._allowed is None:
            self._allowed = self.layout.allowed(logits.shape[-1], logits.device)
        kind = self.layout.kind(new_index.to(logits.device))
        return logits.masked_fill(~self._allowed[kind], float("-inf"))

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask, uncond_input_ids=None, uncond_attention_mask=None, **kwargs):
        cond_kw = {k: v for k, v in kwargs.items() if not k.startswith("uncond_")}
        uncond_kw = {k[len("uncond_"):]: v for k, v in kwargs.items() if k.startswith("uncond_")}
        self.guided = self.guidance_scale != 1.0 and (uncond_input_ids is not None or uncond_kw)
        B = input_ids.shape[0]
        if self.guided:
            if uncond_input_ids is None:
                uncond_input_ids, uncond_attention_mask = input_ids, attention_mask
            if uncond_attention_mask is None:
                uncond_attention_mask = torch.ones_like(uncond_input_ids)
            T = max(input_ids.shape[1], uncond_input_ids.shape[1])
            ids = torch.cat([_left_pad(input_ids, T), _left_pad(uncond_input_ids, T)])
            mask = torch.cat([_left_pad(attention_mask, T), _left_pad(uncond_attention_mask, T)])
            for k in set(cond_kw) | set(uncond_kw):
                cond_kw[k] = _stack_kwarg(cond_kw.get(k), uncond_kw.get(k), k)
            logits = self.inner.prefill(ids, mask, **cond_kw)
        else:
            logits = self.inner.prefill(input_ids, attention_mask, **cond_kw)
        self._prompt = self.inner.num_valid()[:B].clone()
        return self._combine(logits.unsqueeze(1), torch.zeros(B, 1, dtype=torch.long))[:, 0]

    def num_valid(self):
        return self.inner.num_valid()[: self._prompt.shape[0]]

    def checkpoint(self):
        self.inner.checkpoint()

    @torch.no_grad()
    def forward(self, tokens, valid, tree=None):
        """Block [B, L] (CPU validity [B, L]) -> guided, forced scores [B, L, V]; cond and uncond rows share the
        block and, with ``tree`` (a ``mmspec.tree.DraftTree`` of the tokens after the first), its tree."""
        new_index = self.num_valid() - self._prompt
        if tree is None:
            step = valid.long().cumsum(-1)
        else:
            step = tree.depths().cpu() + 1
        new_index = new_index.unsqueeze(1) + step  # index each position predicts
        if self.guided:
            tokens, valid = torch.cat([tokens, tokens]), torch.cat([valid, valid])
            if tree is not None:
                tree = tree.stacked(2)
        logits = self.inner.forward(tokens, valid) if tree is None else self.inner.forward(tokens, valid, tree=tree)
        return self._combine(logits, new_index)

    def rollback(self, keep):
        self.inner.rollback(torch.cat([keep, keep]) if self.guided else keep)


def _left_pad(t: torch.Tensor, length: int, value=0) -> torch.Tensor:
    if t.shape[1] == length:
        return t
    pad = t.new_full((t.shape[0], length - t.shape[1]), value)
    return torch.cat([pad, t], dim=1)


def _stack_kwarg(cond, uncond, name):
    if cond is None or uncond is None:
        raise ValueError(f"guidance needs `{name}` for both rows: pass `{name}` and `uncond_{name}`.")
    if isinstance(cond, torch.Tensor):
        return torch.cat([cond, uncond])
    raise ValueError(f"cannot batch the non-tensor argument `{name}` for guidance.")
