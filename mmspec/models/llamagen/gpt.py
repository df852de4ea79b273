"""The LlamaGen GPT (``autoregressive/models/gpt.py``) with a transformers-style forward.

Unlike LlamaGen's ``Transformer.forward`` (which owns a static KV cache), :meth:`LlamaGenGPT.forward` is driven
like a transformers causal LM: ``transformers.DynamicCache`` as the KV cache, a 2-D 0/1 ``attention_mask`` over
all cached positions (padding and holes anywhere), and ``position_ids`` that index the 2-D rotary table. Position
convention (the *logical* position of a token):

* ``p < cls_token_num``: condition token ``p`` (class embedding or caption token). LlamaGen's rotary table holds
  zeros there, so condition queries/keys are zero vectors - reproduced on purpose.
* ``p >= cls_token_num``: image token ``p - cls_token_num`` in raster order on the ``sqrt(block_size)`` x
  ``sqrt(block_size)`` grid; the first half of every head's rotary pairs rotates by the grid row, the second
  half by the grid column.

It is a diffusers ``ModelMixin`` (``save_pretrained`` / ``from_pretrained``, pipelines save it as a component);
``model.config`` is a :class:`~mmspec.models.llamagen.LlamaGenConfig`.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ModelMixin  # noqa: F401  (diffusers' pipeline loader looks the base class up in this module)

from ..compat import make_output
from .config import GPT_PRESETS, DataclassConfigModel, LlamaGenConfig, _make_config
from .layers import CaptionEmbedder, LabelEmbedder, RMSNorm, TransformerBlock, _compute_dtype, precompute_freqs_cis_2d

__all__ = ["LlamaGenGPT", "build_gpt"]


class LlamaGenGPT(DataclassConfigModel):
    """LlamaGen's autoregressive image transformer with a transformers-style forward.

    State-dict keys (``i`` over layers)::

        cls_embedding.embedding_table.weight                  # c2i: [num_classes + (class_dropout_prob > 0), dim]
        cls_embedding.cap_proj.fc1.weight, ...fc2.weight      # t2i: [dim, caption_dim], [dim, dim]
        cls_embedding.uncond_embedding                        # t2i buffer: [120, caption_dim]
        tok_embeddings.weight                                 # [vocab_size, dim]
        layers.{i}.attention.wqkv.weight                      # [(n_head + 2 n_kv_head) * head_dim, dim]
        layers.{i}.attention.wo.weight                        # [dim, dim]
        layers.{i}.feed_forward.w1/w3.weight, .w2.weight      # [hidden, dim], [dim, hidden]
        layers.{i}.attention_norm.weight, layers.{i}.ffn_norm.weight
        norm.weight, output.weight                            # [dim], [vocab_size, dim]
    """

    config_dataclass = LlamaGenConfig

    def __init__(self, config: LlamaGenConfig | None = None, **kwargs):
        super().__init__()
        config = self._init_config(config, kwargs)
        self.vocab_size = config.vocab_size
        self.n_layer = config.n_layer
        self.block_size = config.block_size
        self.num_classes = config.num_classes
        self.model_type = config.model_type
        self.cls_token_num = config.cls_token_num
        if config.model_type == "c2i":
            self.cls_embedding = LabelEmbedder(config.num_classes, config.dim, config.class_dropout_prob)
        else:
            self.cls_embedding = CaptionEmbedder(config.caption_dim, config.dim, config.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        rates = torch.linspace(0, config.drop_path_rate, config.n_layer, device="cpu").tolist()
        self.layers = nn.ModuleList(TransformerBlock(config, rates[i]) for i in range(config.n_layer))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # float32 rotary table; a plain attribute (not a buffer) so ``model.to(bfloat16)`` leaves it float32
        # and it never enters the state dict - as in LlamaGen.
        self._rope_cpu = precompute_freqs_cis_2d(
            config.grid_size, config.head_dim, config.rope_base, config.cls_token_num
        )
        self._rope_by_device: dict[torch.device, torch.Tensor] = {}
        self.init_weights()

    # -- construction helpers ---------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset: str, **kwargs) -> LlamaGenGPT:
        """``LlamaGenGPT.from_preset("GPT-B", vocab_size=16384, block_size=256)``."""
        return cls(_make_config(LlamaGenConfig, preset, GPT_PRESETS, kwargs))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> LlamaGenGPT:
        """diffusers' ``ModelMixin.from_pretrained`` (a folder with ``config.json``), plus two more sources read by
        :func:`~mmspec.models.llamagen.load_gpt`: a checkpoint file (LlamaGen's ``.pt`` or safetensors), and a
        folder written by mmspec 0.1 (``model.safetensors`` with the config in its metadata). For those two only
        ``torch_dtype`` / ``dtype`` and ``device`` are honoured."""
        from .checkpoint import checkpoint_file, load_gpt, loader_kwargs

        file = checkpoint_file(pretrained_model_name_or_path)
        if file is not None:
            return load_gpt(file, **loader_kwargs(kwargs))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def init_weights(self, zero_output: bool = True) -> None:
        """LlamaGen's initialisation: N(0, initializer_range) for Linear/Embedding weights, zero output
        head (the t2i unconditional caption keeps its N(0, 1/caption_dim) draw, RMSNorm weights ones)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        if zero_output:
            nn.init.zeros_(self.output.weight)

    # -- transformers-style accessors ---------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.output

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def freqs_cis(self) -> torch.Tensor:
        """The float32 rotary table [cls_token_num + block_size, head_dim // 2, 2] on the model's device."""
        return self._rope(self.device)

    def _rope(self, device: torch.device) -> torch.Tensor:
        table = self._rope_by_device.get(device)
        if table is None:
            table = self._rope_cpu.to(device)
            self._rope_by_device[device] = table
        return table

    # -- conditions ------------------------------------------------------------------------------------
    def embed_condition(self, cond: torch.Tensor, cond_drop: torch.Tensor | None = None) -> torch.Tensor:
        """Condition tokens.

        Args:
            cond: c2i: LongTensor [B] class labels (``num_classes`` = null class);
                t2i: float [B, T, caption_dim] caption features with T >= cls_token_num (only the first
                cls_token_num tokens are used, as LlamaGen slices ``[:, :cls_token_num]``).
            cond_drop: optional bool/0-1 [B]; True replaces the row's condition by the null class / the
                learned unconditional caption. In training mode without it, rows are dropped at random with
                probability ``class_dropout_prob`` (LlamaGen's CFG training).
        Returns:
            [B, cls_token_num, dim].
        """
        if self.model_type == "c2i":
            cond = torch.as_tensor(cond, device=self.device)
            return self.cls_embedding(cond, cond_drop)
        if cond.dim() != 3 or cond.shape[-1] != self.config.caption_dim:
            raise ValueError(
                f"t2i condition must be [B, T, {self.config.caption_dim}] caption features, got {tuple(cond.shape)}"
            )
        if cond.shape[1] < self.cls_token_num:
            raise ValueError(
                f"captions have {cond.shape[1]} tokens, the model needs cls_token_num={self.cls_token_num}"
            )
        return self.cls_embedding(cond[:, : self.cls_token_num], cond_drop)

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional counterpart of ``cond`` as LlamaGen's ``generate`` builds it: the null class
        label for c2i, the learned unconditional caption for t2i (same shape as ``cond``)."""
        if self.model_type == "c2i":
            if self.config.class_dropout_prob <= 0:
                raise ValueError("this c2i model has no null class (class_dropout_prob == 0), so no CFG")
            return torch.full_like(torch.as_tensor(cond), self.num_classes)
        T = cond.shape[1]
        if T > self.cls_embedding.uncond_embedding.shape[0]:
            raise ValueError(f"captions of {T} tokens are longer than the unconditional caption")
        return torch.zeros_like(cond) + self.cls_embedding.uncond_embedding[:T].to(cond)

    # -- forward -----------------------------------------------------------------------------------------
    def rotary_for_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """position_ids: Long [B, L] logical positions -> rotary rows [B, L, head_dim // 2, 2] (float32)."""
        table = self._rope(position_ids.device)
        # Checked on the CPU only: on an accelerator the check would force a host sync every step (an
        # out-of-range index still fails there, as a device-side assert).
        if position_ids.device.type == "cpu" and position_ids.numel():
            lo, hi = int(position_ids.min()), int(position_ids.max())
            if lo < 0 or hi >= table.shape[0]:
                raise IndexError(
                    f"position_ids must lie in [0, {table.shape[0] - 1}] (cls_token_num={self.cls_token_num} condition "
                    f"positions + block_size={self.block_size} image positions); got [{lo}, {hi}]"
                )
        return table[position_ids]

    @staticmethod
    def build_attention_mask(
        attention_mask: torch.Tensor | None, cache_position: torch.Tensor, batch_size: int, key_len: int
    ) -> torch.Tensor:
        """Boolean attention mask [B, 1, L, K] (True = attend).

        Query ``i`` (cache slot ``cache_position[i]``) may attend key slot ``j`` iff ``j <= cache_position[i]``
        and ``attention_mask[b, j] == 1``; a query always attends its own slot (as LlamaGen's ``emb_masks``
        handling does), so fully masked rows stay finite.

        Args:
            attention_mask: None or 0/1 [B, K] over all cached slots (past + current).
            cache_position: Long [L] cache slots of the current tokens.
        """
        keys = torch.arange(key_len, device=cache_position.device)
        allowed = keys[None, :] <= cache_position[:, None]  # [L, K]
        diag = keys[None, :] == cache_position[:, None]
        if attention_mask is None:
            return allowed[None, None].expand(batch_size, 1, -1, -1)
        if attention_mask.shape != (batch_size, key_len):
            raise ValueError(
                f"2-D attention_mask must be [B, past + L] = [{batch_size}, {key_len}], "
                f"got {tuple(attention_mask.shape)}"
            )
        am = attention_mask.to(device=cache_position.device).bool()
        return ((allowed[None] & am[:, None, :]) | diag[None])[:, None]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        cond: torch.Tensor | None = None,
        cond_drop: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        cache_position: torch.Tensor | None = None,
        use_cache: bool = True,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool = False,
        labels: torch.Tensor | None = None,
        **kwargs,
    ):
        """Run L new positions on top of an optional KV cache.

        The new positions are, in order: the ``cls_token_num`` condition tokens if ``cond`` is given (only
        at prefill), then the image tokens ``input_ids`` (or ``inputs_embeds``).

        Args:
            input_ids: Long [B, L_img] image token ids (may be None or [B, 0] at prefill).
            cond: condition, see :meth:`embed_condition` (c2i: Long [B]; t2i: float [B, T, caption_dim]).
            cond_drop: optional bool [B]: use the null/unconditional condition in these rows.
            inputs_embeds: float [B, L_img, dim] instead of ``input_ids``.
            attention_mask: 0/1 [B, past + L] over every cache slot (0 = padding or hole anywhere), combined
                with causality; or a ready 4-D mask [B|1, 1, L, past + L] (bool True = attend, or additive
                float) used as given.
            position_ids: Long [B, L] logical positions into the rotary table (``p < cls_token_num``:
                condition slot; ``p >= cls_token_num``: image token ``p - cls_token_num``). Default:
                ``cache_position`` (no holes).
            past_key_values: ``transformers.DynamicCache`` (created when None and ``use_cache``); updated
                in place with the new keys/values (``n_kv_head`` heads), so ``cache.crop(-n)`` rolls back.
            cache_position: Long [L] cache slots of the new positions; default ``past + arange(L)``.
            use_cache: create a cache when none is given.
            logits_to_keep: 0 = logits for all L positions; n > 0 = the last n; or a 1-D index tensor.
            output_hidden_states: also return per-layer hidden states.
            labels: optional Long [B, L'] targets aligned with the returned logits (cross-entropy, -100
                ignored); LlamaGen's training uses logits ``[:, cls_token_num - 1 : -1]`` for image targets.
        Returns:
            ``transformers.modeling_outputs.CausalLMOutputWithPast`` with ``logits`` float [B, L', vocab_size]
            (float32 for 16/32-bit models, as LlamaGen's ``.float()``; L' = L or the kept tail),
            ``past_key_values`` (the DynamicCache, None if ``use_cache=False`` and none was given),
            ``hidden_states`` (each layer's input [B, L, dim] plus the final normed states, on request)
            and ``loss`` (with ``labels``).
        """
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("pass input_ids or inputs_embeds, not both")
        parts = []
        if cond is not None:
            parts.append(self.embed_condition(cond, cond_drop))
        if inputs_embeds is not None:
            parts.append(inputs_embeds)
        elif input_ids is not None:
            parts.append(self.tok_embeddings(input_ids))
        if not parts:
            raise ValueError("nothing to run: give cond (prefill) and/or input_ids / inputs_embeds")
        if len(parts) > 1:
            parts[1] = parts[1].to(parts[0].dtype)
        h = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        h = self.tok_dropout(h)
        B, L, _ = h.shape
        device = h.device

        if past_key_values is None and use_cache:
            from transformers import DynamicCache

            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        explicit_slots = cache_position is not None
        if cache_position is None:
            cache_position = torch.arange(past, past + L, device=device)
        cache_position = cache_position.to(device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0).expand(B, L)
        position_ids = position_ids.to(device)
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0).expand(B, L)
        rope = self.rotary_for_positions(position_ids)
        key_len = past + L

        is_causal = False
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask.to(device)
            if mask.dtype != torch.bool:
                mask = mask.to(h.dtype)
        elif attention_mask is None and not explicit_slots and (L == 1 or past == 0):
            mask, is_causal = None, L > 1  # plain causal: let SDPA pick its fast path
        else:
            mask = self.build_attention_mask(attention_mask, cache_position, B, key_len)

        hidden = [] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if hidden is not None:
                hidden.append(h)
            h = layer(h, rope, mask, is_causal, past_key_values, i)
        h = self.norm(h)
        if hidden is not None:
            hidden.append(h)
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
        else:
            h = h[:, logits_to_keep.to(device)]
        logits = self.output(h)
        logits = logits.to(_compute_dtype(logits.dtype))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.to(device).flatten(), ignore_index=-100)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return make_output(
            CausalLMOutputWithPast, loss=loss, logits=logits, past_key_values=past_key_values,
            hidden_states=tuple(hidden) if hidden is not None else None,
        )


def build_gpt(preset: str | None = None, **kwargs) -> LlamaGenGPT:
    """Build a GPT from a preset name in :data:`GPT_PRESETS` and/or ``LlamaGenConfig`` kwargs."""
    return LlamaGenGPT(_make_config(LlamaGenConfig, preset, GPT_PRESETS, kwargs))
