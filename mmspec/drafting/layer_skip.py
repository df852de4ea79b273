"""Self-speculative drafting by layer skipping (Zhang et al. 2023, "Draft & Verify").

The target with some of its decoder layers skipped drafts for itself: no extra weights, same token space,
so every model (text LMs, VLMs, image-token families) gets a draft model. ``layer_skip_model`` builds that
draft as a *view* of the target:

* the modules on the path from the root to the decoder-layer ``ModuleList`` are shallow-copied (new
  ``_modules`` dicts, the same parameter tensors), and the copied list holds only the kept layers;
* each kept layer's submodules are shallow-copied too, so that the attention modules can carry their
  *compact* ``layer_idx`` (the draft's own ``DynamicCache`` has one entry per kept layer);
* the configs those modules read are copied with the layer count (``num_hidden_layers`` / ``n_layer``) and
  ``layer_types`` cut to the kept layers.

The target's modules, weights and KV cache are never touched: the draft runs its own forward with its own
cache (driven by ``DraftModelProposer`` through the family's own adapter, so guidance and structural
forcing apply to the draft rows exactly as to the target's).

Calibration (``calibrate_skip``) chooses the skipped set when none is given: the target decodes a short
continuation of a few prompts (sampled from a seeded generator, so the choice is deterministic given the
seed); each layer is scored by the draft/target agreement when it alone is skipped; nested sets of the
least important layers, and the early exits (the first ``e`` layers kept, the draft a model trained with
early-exit losses is built for: LayerSkip, Elhoushi et al. 2024), are then scored by the bench's expected tokens
per unit cost. Costs are *measured*
by default (``costs="measure"``): on this device, the target's forward over a window of 1..k+1 tokens and each
candidate draft's one-token forward, timed on the calibration prompts, so a fixed per-forward cost (embedding,
LM head, the framework's own overhead: about half of a small model's forward on a CPU) is not mistaken for
nothing. ``costs="layers"`` is the idealised model (a draft forward costs ``kept / total`` of a target forward,
any window costs one forward): deterministic given the seed, and what a large model on a GPU approaches. When no
set pays for itself under the cost model, the calibration says so (``num_drafts == 0``) and ``method="self"``
decodes without drafts (with a warning) rather than slower than plain decoding.
"""

from __future__ import annotations

import copy
import time
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["layer_skip_model", "SkipCalibration", "calibrate_skip", "decoder_layers", "expected_speedup",
           "self_draft_proposer"]

_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _text_config(config):
    if hasattr(config, "get_text_config"):
        try:
            return config.get_text_config(decoder=True)
        except TypeError:
            return config.get_text_config()
    return config


def decoder_layers(model) -> tuple[str, nn.ModuleList]:
    """Find the decoder's layer list: ``(dotted name, ModuleList)``.

    The list is looked up inside ``model.get_decoder()`` when the model has one (the language model of a VLM),
    else in the whole model: the ``ModuleList`` whose length is the text config's layer count; among several
    (a vision tower of the same depth), the one whose modules carry a ``layer_idx`` (attention with a KV
    cache), else the first.
    """
    config = _text_config(getattr(model, "config", None))
    count = next((getattr(config, k) for k in _LAYER_COUNT_KEYS if isinstance(getattr(config, k, None), int)), None)
    if count is None and isinstance(getattr(model, "num_hidden_layers", None), int):
        count = model.num_hidden_layers
    scope, prefix = model, ""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if isinstance(decoder, nn.Module) and decoder is not model:
        for name, module in model.named_modules():
            if module is decoder:
                scope, prefix = decoder, name + "." if name else ""
                break
    found = [(prefix + name, m) for name, m in scope.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0 and (count is None or len(m) == count)]
    if not found:
        raise TypeError(
            f"layer skipping needs the decoder layers in an nn.ModuleList of {count} layers; none found in "
            f"{type(model).__name__}."
        )
    with_cache = [(n, m) for n, m in found if any(hasattr(s, "layer_idx") for s in m[0].modules())]
    return (with_cache or found)[0]


def _detach_copy(module: nn.Module) -> nn.Module:
    """A shallow copy owning its own child/parameter/buffer dicts (the tensors themselves are shared)."""
    if getattr(module, "_hf_hook", None) is not None:
        raise TypeError(
            "layer-skip drafting cannot copy modules dispatched by accelerate (device_map offload hooks); load "
            "the model on one device for method='self'."
        )
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    return clone


def _deep_view(module: nn.Module) -> nn.Module:
    """Shallow-copy every module of a subtree (weights shared) so per-layer attributes can be changed."""
    clone = _detach_copy(module)
    for name, child in module._modules.items():
        if child is not None:
            clone._modules[name] = _deep_view(child)
    return clone


def layer_skip_model(model, skip) -> nn.Module:
    """The layer-skip draft view of ``model``.

    Args:
        model: a transformers causal LM, VLM or image-token model whose decoder layers are an ``nn.ModuleList``.
        skip: indices of the decoder layers to skip (non-empty, not every layer, each in ``[0, num_layers)``).

    Returns:
        a module of the target's class that runs the kept layers only, sharing the target's weights (no copy);
        ``mmspec_skip`` / ``mmspec_keep`` hold the skipped / kept indices. Do not move it (``.to``): its
        weights are the target's.
    """
    name, layers = decoder_layers(model)
    skip = check_skip(skip, len(layers))
    keep = [i for i in range(len(layers)) if i not in skip]
    old_configs = {}  # id(original config) -> copy with the kept layer count
    root_config = getattr(model, "config", None)
    text_config = _text_config(root_config)
    if root_config is not None:
        new_root = copy.deepcopy(root_config)
        new_text = _text_config(new_root)
        _cut_config(new_text, keep, len(layers))
        old_configs[id(root_config)] = new_root
        old_configs[id(text_config)] = new_text

    def with_config(module):
        config = getattr(module, "config", None)
        if config is not None and id(config) in old_configs:
            module.config = old_configs[id(config)]
        return module

    root = with_config(_detach_copy(model))
    parent, parts = root, name.split(".")
    for part in parts[:-1]:
        child = with_config(_detach_copy(parent._modules[part]))
        parent._modules[part] = child
        parent = child
    kept = []
    for new_idx, old_idx in enumerate(keep):
        layer = _deep_view(layers[old_idx])
        for sub in layer.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = new_idx
            with_config(sub)
        kept.append(layer)
    parent._modules[parts[-1]] = nn.ModuleList(kept)
    root.mmspec_skip = tuple(skip)
    root.mmspec_keep = tuple(keep)
    return root


def _cut_config(config, keep, total):
    for key in _LAYER_COUNT_KEYS:
        if getattr(config, key, None) == total:
            try:
                setattr(config, key, len(keep))
            except AttributeError:  # a read-only alias
                pass
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == total:
        config.layer_types = [layer_types[i] for i in keep]


def check_skip(skip, num_layers: int) -> list[int]:
    """Validate ``skip`` (layer indices) against ``num_layers``; returns the sorted unique indices."""
    if isinstance(skip, int) and not isinstance(skip, bool):
        skip = [skip]
    try:
        values = list(skip)
    except TypeError:
        raise ValueError(f"`skip` must be a list of layer indices, got {skip!r}.") from None
    if not values:
        raise ValueError("`skip` is empty: give at least one layer index to skip (or skip=None to calibrate).")
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ValueError(f"`skip` must hold int layer indices, got {values!r}.")
    bad = [v for v in values if not 0 <= v < num_layers]
    if bad:
        raise ValueError(f"`skip` indices {bad} are out of range: this model has layers 0..{num_layers - 1}.")
    values = sorted(set(values))
    if len(values) == num_layers:
        raise ValueError(f"`skip` names all {num_layers} layers: the draft must keep at least one layer.")
    return values


def expected_speedup(alpha: float, cost: float, max_drafts: int, window_cost=None) -> tuple[float, int]:
    """Expected tokens per unit of target cost and the draft length achieving it.

    With per-token acceptance ``alpha`` a step of ``k`` drafts commits ``(1 - alpha^(k+1)) / (1 - alpha)``
    tokens and costs ``window_cost[k] + k * cost`` one-token target forwards (``window_cost[k]``: a target
    forward over ``k + 1`` tokens; 1 for every k when None). Returns the best ``(tokens per cost, k)`` over
    ``1 <= k <= max_drafts`` (below 1.0: drafting is slower than plain decoding).
    """
    best = (0.0, 1)
    for k in range(1, max_drafts + 1):
        tokens = k + 1 if alpha >= 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)
        verify = 1.0 if window_cost is None else window_cost[min(k, len(window_cost) - 1)]
        best = max(best, (tokens / (verify + k * cost), k))
    return best


def _forward_seconds(adapter, batch: int, width: int, device, repeats: int = 5) -> float:
    """Best of ``repeats`` timed forwards of ``width`` tokens per row on a prefilled adapter (rolled back)."""
    block = torch.ones(batch, width, dtype=torch.long, device=device)
    valid = torch.ones(batch, width, dtype=torch.bool)
    none = torch.zeros(batch, dtype=torch.long)
    best = float("inf")
    for i in range(repeats + 2):  # the first two are warm-up (lazy allocations, first kernels at this shape)
        adapter.checkpoint()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        adapter.forward(block, valid)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            best = min(best, time.perf_counter() - t0)
        adapter.rollback(none)
    return best


@dataclass(frozen=True)
class SkipCalibration:
    """Result of ``calibrate_skip``.

    Attributes:
        skip: the chosen skipped layer indices (the best set, even when it does not pay).
        num_drafts: the draft length that maximises the expected speedup; 0 when even the best set would be
            slower than plain decoding (``speedup < 1``).
        alpha: measured per-token agreement of the draft with the target.
        speedup: expected tokens per unit of target cost of drafting with ``skip`` at its best draft length
            (1.0 = plain decoding).
        scores: ``{skip tuple: (alpha, speedup)}`` for every set evaluated.
        draft_costs: ``{skip tuple: cost of one draft forward in target forwards}`` (measured or by layer count).
        window_cost: cost of a target forward over ``k + 1`` tokens, in one-token forwards, for ``k = 0..``
            (measured; all 1.0 under ``costs="layers"``).
    """

    skip: tuple
    num_drafts: int
    alpha: float
    speedup: float
    scores: dict
    draft_costs: dict = None
    window_cost: tuple = ()


_CALIBRATIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _rollout(adapter, prompts, prefill_kwargs, new_tokens, greedy, generator):
    """Target continuation: (tokens [B, n], rows [B, n, V]); rows[:, i] is the distribution of tokens[:, i]."""
    ids, mask = prompts
    logits = adapter.prefill(ids, mask, **prefill_kwargs).float()
    tokens, rows = [], []
    valid = torch.ones(ids.shape[0], 1, dtype=torch.bool)
    for i in range(new_tokens):
        rows.append(logits)
        probs = logits.softmax(-1)
        if greedy:
            tok = probs.argmax(-1)
        else:
            tok = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(probs.device)
        tokens.append(tok)
        if i + 1 < new_tokens:
            logits = adapter.forward(tok.unsqueeze(1), valid)[:, -1].float()
    return torch.stack(tokens, 1), torch.stack(rows, 1)


def _agreement(adapter, prompts, prefill_kwargs, tokens, rows, greedy) -> float:
    """Teacher-forced draft rows on the target's continuation -> mean acceptance rate per token."""
    ids, mask = prompts
    first = adapter.prefill(ids, mask, **prefill_kwargs).float()
    rest = adapter.forward(tokens[:, :-1], torch.ones(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool))
    draft = torch.cat([first.unsqueeze(1), rest.float()], dim=1)
    if greedy:
        return float((draft.argmax(-1) == rows.argmax(-1)).double().mean())
    p, q = rows.softmax(-1), draft.softmax(-1)
    return float(torch.minimum(p, q).sum(-1).double().mean())  # 1 - total variation: exact acceptance rate


@torch.no_grad()
def calibrate_skip(model, input_ids, attention_mask=None, *, make_adapter=None, prefill_kwargs=None,
                   new_tokens: int = 24, max_drafts: int = 8, greedy: bool = True, seed: int = 0,
                   max_prompts: int = 4, cache: bool = True, costs: str = "measure") -> SkipCalibration:
    """Choose the layers to skip for self-speculative drafting of ``model``.

    Args:
        model: the target model.
        input_ids, attention_mask: [B, T] calibration prompts (left padded); the first ``max_prompts`` rows
            are used.
        make_adapter: ``fn(model) -> adapter`` (``prefill`` / ``forward``), e.g. the family's guided adapter;
            ``mmspec.models.vlm.adapter_for`` by default.
        prefill_kwargs: extra prefill arguments (processor outputs, unconditional prompts), already sliced to
            the calibration rows.
        new_tokens: continuation length decoded by the target (sampled from ``seed`` unless ``greedy``) when
            ``max_prompts`` rows are given; with fewer rows it grows so that as many tokens are scored.
        max_drafts: the longest draft considered by the cost model.
        greedy: score argmax agreement (greedy decoding) rather than ``sum min(p, q)`` (sampling).
        seed: seeds the sampled continuation; the agreements are deterministic given it.
        cache: reuse (and store) the choice made for this model object with the same settings.
        costs: ``"measure"`` (time the target's window forwards and each draft's forward on this device: the
            choice follows this machine's real costs, so it may differ between machines and, near a tie, between
            runs) or ``"layers"`` (a draft costs ``kept / total``, any window one forward: deterministic given
            ``seed``).

    Returns:
        ``SkipCalibration``. Cost: ``new_tokens`` target forwards plus about ``3 L`` teacher-forced draft
        forwards (``L`` layers), and with ``costs="measure"`` about ``5 (max_drafts + 1 + 2 L)`` timed forwards.
    """
    from ..models.vlm import adapter_for

    make_adapter = make_adapter or adapter_for
    if costs not in ("measure", "layers"):
        raise ValueError(f"`costs` must be 'measure' or 'layers', got {costs!r}.")
    key = (greedy, seed, new_tokens, max_drafts, costs)
    if cache and key in _CALIBRATIONS.get(model, {}):
        return _CALIBRATIONS[model][key]
    if new_tokens < 2:
        raise ValueError(f"`new_tokens` must be >= 2 for calibration, got {new_tokens!r}.")
    _, layers = decoder_layers(model)
    L = len(layers)
    if L < 2:
        raise ValueError("layer skipping needs a model with at least 2 decoder layers.")
    ids = input_ids[:max_prompts]
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask[:max_prompts]
    # the same number of scored tokens (new_tokens x max_prompts) however few prompts there are
    new_tokens = -(-new_tokens * max_prompts // ids.shape[0])
    kwargs = dict(prefill_kwargs or {})
    generator = torch.Generator().manual_seed(seed)
    target = make_adapter(model)
    tokens, rows = _rollout(target, (ids, mask), kwargs, new_tokens, greedy, generator)
    measure = costs == "measure"
    B, device = ids.shape[0], tokens.device
    if measure:  # the target's forward over 1..max_drafts+1 tokens, in one-token forwards
        one = _forward_seconds(target, B, 1, device)
        windows = [_forward_seconds(target, B, k + 1, device) for k in range(1, max_drafts + 1)]
        one = min(one, _forward_seconds(target, B, 1, device))  # again after the windows: the faster of the two
        window_cost = tuple([1.0] + [w / one for w in windows])
    else:
        window_cost = tuple([1.0] * (max_drafts + 1))
    scores, draft_costs = {}, {}

    def score(skip):
        skip = tuple(skip)
        if skip not in scores:
            drafter = make_adapter(layer_skip_model(model, list(skip)))
            alpha = _agreement(drafter, (ids, mask), kwargs, tokens, rows, greedy)
            draft_costs[skip] = _forward_seconds(drafter, B, 1, device) / one if measure else (L - len(skip)) / L
            scores[skip] = (alpha, *expected_speedup(alpha, draft_costs[skip], max_drafts, window_cost))
        return scores[skip]

    # Importance of each layer alone, then nested sets of the least important ones (ties: later layers first),
    # then the early exits (keep the first e layers: what a model trained with early-exit losses is built for).
    order = sorted(range(L), key=lambda i: (-score([i])[0], -i))
    nested = []
    for n in range(1, L):
        nested.append(tuple(sorted(order[:n])))
        if score(nested[-1])[0] < 1e-3:
            break
    best = None
    for skip in nested + [tuple(range(e, L)) for e in range(1, L)]:
        alpha, speedup, k = score(skip)
        if best is None or speedup > best.speedup + 1e-12:
            best = SkipCalibration(skip, k, alpha, speedup, {})
    result = SkipCalibration(best.skip, best.num_drafts if best.speedup > 1.0 else 0, best.alpha, best.speedup,
                             {s: (a, sp) for s, (a, sp, _) in scores.items()}, dict(draft_costs), window_cost)
    if cache:
        _CALIBRATIONS.setdefault(model, {})[key] = result
    return result


def self_draft_proposer(model, input_ids, attention_mask, *, skip=None, window: int, adaptive: bool = False,
                        confidence=None, prefill_kwargs=None, make_adapter=None, greedy: bool = True,
                        calibration_kwargs=None, tree=None):
    """A ``DraftModelProposer`` driving the layer-skip view of ``model`` (``method="self"``).

    ``skip=None`` calibrates on ``input_ids`` (see ``calibrate_skip``, cached per model; the calibration scores
    chains). ``window`` is the verified block (anchor + ``window - 1`` drafts); with ``adaptive`` it is the cap.
    ``tree=(width, depth)``: the view drafts an EAGLE-2-style token tree of ``window - 1`` nodes instead of a chain
    (``mmspec.drafting.draft_tree``).
    """
    from ..models.vlm import adapter_for
    from .model import DraftModelProposer

    make_adapter = make_adapter or adapter_for
    if confidence is not None and not 0.0 <= confidence <= 1.0:
        raise ValueError(f"`draft_confidence` must be in [0, 1] or None, got {confidence!r}.")
    if skip is None:
        # Processor outputs (pixel values) are not always batched by row: calibrate on every row then.
        rows = input_ids.shape[0] if prefill_kwargs else 4
        cal = calibrate_skip(model, input_ids, attention_mask, make_adapter=make_adapter,
                             prefill_kwargs=prefill_kwargs, greedy=greedy, max_prompts=rows,
                             max_drafts=max(1, window - 1), **(calibration_kwargs or {}))
        skip = list(cal.skip)
        if cal.num_drafts == 0:
            from .base import NoDraft

            warnings.warn(
                f"method='self': layer skipping does not pay for this model here (best set {list(cal.skip)}: "
                f"agreement {cal.alpha:.2f}, expected {cal.speedup:.2f}x plain decoding with measured costs); "
                "decoding without drafts. Pass skip=[...] to draft anyway.", stacklevel=3)
            return NoDraft()
    drafter = make_adapter(layer_skip_model(model, skip))
    start = min(5, window - 1) if adaptive else window - 1
    return DraftModelProposer(drafter, max(start, 1) if window > 1 else 0, adaptive=adaptive,
                              max_drafts=window - 1, confidence=confidence, prefill_kwargs=prefill_kwargs or {},
                              tree=tree)

