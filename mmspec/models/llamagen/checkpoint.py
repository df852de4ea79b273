"""Checkpoint I/O for the LlamaGen GPT and VQ: LlamaGen's ``.pt`` files, safetensors, strict loading.

:func:`load_gpt` / :func:`load_vq` read LlamaGen's public checkpoints (DDP, DeepSpeed, FSDP and EMA layouts,
``torch.compile`` prefixes) and safetensors written by :func:`save_gpt` / :func:`save_vq`, which carry the config
in their metadata. Loading is strict: a missing, unexpected or mis-shaped key is an error listing all of them.
(``save_pretrained`` / ``from_pretrained`` folders are diffusers' format, see :class:`LlamaGenGPT`.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any

import torch
import torch.nn as nn

from .config import GPT_PRESETS, VQ_PRESETS, LlamaGenConfig, LlamaGenVQConfig, _make_config
from .gpt import LlamaGenGPT
from .vq import LlamaGenVQ

__all__ = ["read_state_dict", "infer_gpt_args", "load_gpt", "load_vq", "save_gpt", "save_vq"]

_CONFIG_META_KEY = "mmspec_llamagen_config"
# Derived / runtime tensors that some LlamaGen-era checkpoints carry; they are not weights and are dropped.
_GPT_DERIVED_KEYS = re.compile(r"^(freqs_cis|causal_mask|layers\.\d+\.attention\.kv_cache\.[kv]_cache)$")
_PREFIXES = ("_orig_mod.", "module.")


def _torch_load(path: str, weights_only: bool):
    if not weights_only:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        # LlamaGen training checkpoints also pickle the argparse Namespace of the run ("args").
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError and friends
        raise RuntimeError(
            f"could not load {path} with weights_only=True ({type(exc).__name__}: {exc}). If you trust this "
            "file, pass weights_only=False."
        ) from exc


def read_state_dict(
    path: str | os.PathLike, *, use_ema: bool = False, weights_only: bool = True
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a LlamaGen-style checkpoint on the CPU.

    Accepts ``.safetensors`` files and ``torch.save`` files holding ``{"model": sd}`` (LlamaGen DDP),
    ``{"module": sd}`` (DeepSpeed), ``{"state_dict": sd}``, ``{"ema": sd}`` (with ``use_ema``) or a bare
    state dict (LlamaGen FSDP). ``_orig_mod.`` (torch.compile) and ``module.`` (DDP) prefixes are removed.

    Returns:
        (state_dict, saved_config) where ``saved_config`` is the config stored by :func:`save_gpt` /
        :func:`save_vq` in safetensors metadata (``{}`` otherwise).
    """
    path = os.fspath(path)
    saved: dict = {}
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if _CONFIG_META_KEY in meta:
            saved = json.loads(meta[_CONFIG_META_KEY])
        sd = load_file(path, device="cpu")
    else:
        obj = _torch_load(path, weights_only)
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
        if use_ema:
            if "ema" not in obj:
                raise KeyError(f"{path}: use_ema=True but the checkpoint has no 'ema' entry (keys: {sorted(obj)[:10]})")
            sd = obj["ema"]
        elif "model" in obj:
            sd = obj["model"]
        elif "module" in obj:
            sd = obj["module"]
        elif "state_dict" in obj:
            sd = obj["state_dict"]
        elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            sd = obj
        else:
            raise ValueError(
                f"{path}: no 'model' / 'module' / 'state_dict' entry and not a bare state dict "
                f"(keys: {sorted(obj)[:10]})"
            )
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out, saved


def _check_and_load(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad_shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(sd) & set(expected)
        if tuple(sd[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or bad_shapes:
        lines = [f"checkpoint does not match the {what} built from the given arguments:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected}")
        if bad_shapes:
            lines.append(f"  shape mismatches ({len(bad_shapes)}): {bad_shapes}")
        raise ValueError("\n".join(lines))
    model.load_state_dict(sd, strict=True, assign=True)


def infer_gpt_args(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """GPT arguments readable from a state dict's shapes: model_type, vocab_size, dim, n_layer,
    num_classes (c2i, assuming a null-class row) / caption_dim (t2i) and, when (dim, n_layer) matches
    one, the preset's n_head (:func:`load_gpt` then also reads n_kv_head from ``wqkv``). ``cls_token_num`` and
    ``block_size`` are not stored in checkpoints."""
    args: dict[str, Any] = {}
    if "tok_embeddings.weight" in sd:
        args["vocab_size"], args["dim"] = map(int, sd["tok_embeddings.weight"].shape)
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"^layers\.(\d+)\.", k))}
    if layers:
        args["n_layer"] = max(layers) + 1
    if "cls_embedding.embedding_table.weight" in sd:
        args["model_type"] = "c2i"
        args["num_classes"] = int(sd["cls_embedding.embedding_table.weight"].shape[0]) - 1
    elif "cls_embedding.cap_proj.fc1.weight" in sd:
        args["model_type"] = "t2i"
        args["caption_dim"] = int(sd["cls_embedding.cap_proj.fc1.weight"].shape[1])
    for preset in GPT_PRESETS.values():
        if preset["dim"] == args.get("dim") and preset["n_layer"] == args.get("n_layer"):
            args["n_head"] = preset["n_head"]
            break
    return args


def load_gpt(
    path: str | os.PathLike,
    preset: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    use_ema: bool = False,
    weights_only: bool = True,
    **model_args,
) -> LlamaGenGPT:
    """Load a LlamaGen GPT checkpoint (strict: every key must match, else ``ValueError`` listing
    missing/unexpected keys and shape mismatches).

    Precedence of arguments: explicit ``model_args`` > ``preset`` (:data:`GPT_PRESETS`) > config saved by
    :func:`save_gpt` > values inferred from the tensor shapes (:func:`infer_gpt_args`). LlamaGen's ``.pt``
    files do not record ``block_size`` (= (image_size / 16)**2, e.g. 576 for the 384px c2i models) nor
    ``cls_token_num`` (1 for c2i, 120 for t2i): pass them (see :data:`LLAMAGEN_CHECKPOINTS`).
    Derived tensors some checkpoints carry (``freqs_cis``, KV-cache buffers) are dropped.

    Returns the model in eval mode on ``device`` (dtype of the checkpoint unless ``dtype`` is given).
    """
    sd, saved = read_state_dict(path, use_ema=use_ema, weights_only=weights_only)
    sd = {k: v for k, v in sd.items() if not _GPT_DERIVED_KEYS.match(k)}
    args: dict[str, Any] = {**infer_gpt_args(sd), **saved}
    if preset is not None:
        if preset not in GPT_PRESETS:
            raise KeyError(f"unknown preset {preset!r}; known: {sorted(GPT_PRESETS)}")
        args.update(GPT_PRESETS[preset])
    args.update(model_args)
    if args.get("model_type") == "c2i" and "num_classes" not in model_args and "num_classes" not in saved:
        # infer_gpt_args assumed a null-class row; without class dropout there is none.
        if float(args.get("class_dropout_prob", 0.1)) <= 0:
            args["num_classes"] += 1
    wqkv = sd.get("layers.0.attention.wqkv.weight")
    if wqkv is not None and "n_kv_head" not in model_args and "n_kv_head" not in saved:
        n_head, dim = int(args.get("n_head", 32)), int(args.get("dim", 4096))
        heads = wqkv.shape[0] // max(dim // n_head, 1)
        if dim % n_head == 0 and heads > n_head and (heads - n_head) % 2 == 0 and (heads - n_head) // 2 != n_head:
            args["n_kv_head"] = (heads - n_head) // 2  # grouped-query attention checkpoint
    config = _make_config(LlamaGenConfig, None, {}, args)
    with torch.device("meta"):
        model = LlamaGenGPT(config)
    _check_and_load(model, sd, "LlamaGen GPT")
    model._rope_by_device.clear()
    nn.Module.to(model, device=device, dtype=dtype)  # (ModelMixin.to logs a float32-modules warning on any dtype)
    return model.eval()


def load_vq(
    path: str | os.PathLike,
    preset: str | None = "VQ-16",
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    use_ema: bool = False,
    weights_only: bool = True,
    **vq_args,
) -> LlamaGenVQ:
    """Load a LlamaGen VQ tokenizer checkpoint strictly (see :func:`load_gpt` for formats and errors).

    Precedence: ``vq_args`` > config saved by :func:`save_vq` > ``preset``. ``codebook_size`` /
    ``codebook_embed_dim`` and ``codebook_show_usage`` (whether ``quantize.codebook_used`` is present) are
    read from the checkpoint unless given.
    """
    sd, saved = read_state_dict(path, use_ema=use_ema, weights_only=weights_only)
    args: dict[str, Any] = {}
    if preset is not None and not saved:
        if preset not in VQ_PRESETS:
            raise KeyError(f"unknown preset {preset!r}; known: {sorted(VQ_PRESETS)}")
        args.update(VQ_PRESETS[preset])
    if "quantize.embedding.weight" in sd:
        args["codebook_size"], args["codebook_embed_dim"] = map(int, sd["quantize.embedding.weight"].shape)
    args["codebook_show_usage"] = "quantize.codebook_used" in sd
    args.update(saved)
    args.update(vq_args)
    config = _make_config(LlamaGenVQConfig, None, {}, args)
    with torch.device("meta"):
        model = LlamaGenVQ(config)
    _check_and_load(model, sd, "LlamaGen VQ tokenizer")
    nn.Module.to(model, device=device, dtype=dtype)  # (ModelMixin.to logs a float32-modules warning on any dtype)
    return model.eval()


def _save(model: nn.Module, path: str | os.PathLike) -> None:
    path = os.fspath(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, path, metadata={_CONFIG_META_KEY: json.dumps(model.config.to_dict())})
    else:  # LlamaGen's own layout, e.g. for their scripts
        torch.save({"model": sd}, path)


def save_gpt(model: LlamaGenGPT, path: str | os.PathLike) -> None:
    """Write the GPT weights: ``.safetensors`` (config in the metadata, so :func:`load_gpt` needs no
    arguments) or, for any other suffix, LlamaGen's ``torch.save({"model": state_dict})`` layout."""
    _save(model, path)


def save_vq(model: LlamaGenVQ, path: str | os.PathLike) -> None:
    """Write the VQ weights, as :func:`save_gpt`."""
    _save(model, path)


# mmspec 0.1 wrote ``save_pretrained`` folders as this one file with the config in its metadata (the bundled zoo
# c2i model still is one); ``from_pretrained`` keeps reading them.
_LEGACY_PRETRAINED_FILE = "model.safetensors"


def checkpoint_file(path: str | os.PathLike) -> str | None:
    """The file :func:`load_gpt` / :func:`load_vq` should read for ``from_pretrained(path)``: ``path`` itself
    when it is a file, the legacy ``model.safetensors`` of a folder without ``config.json``; None for a
    diffusers folder."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    legacy = os.path.join(path, _LEGACY_PRETRAINED_FILE)
    if os.path.isfile(legacy) and not os.path.isfile(os.path.join(path, "config.json")):
        return legacy
    return None


def loader_kwargs(kwargs: dict) -> dict:
    """``from_pretrained`` keyword arguments -> :func:`load_gpt` ones (dtype and device; the rest is ignored)."""
    dtype = kwargs.get("torch_dtype") if kwargs.get("torch_dtype") is not None else kwargs.get("dtype")
    return {"dtype": dtype, "device": kwargs.get("device") or "cpu"}
