"""``mmspec.generate``: speculative decoding for any transformers causal LM, batched and exact."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .checks import check_decoding, check_generator, check_int
from .compile import cache_options
from .decoding import DecodeState, GenerationStats, decode
from .drafting import TREE_METHODS, available_methods, make_proposer, method_spec
from .drafting.lookahead import lookahead_config
from .models.causal_lm import vocab_size_of
from .models.vlm import adapter_for, is_vision_language_model
from .sampling import LogitsPipeline
from .tree import parse_tree

__all__ = ["generate", "GenerateOutput", "METHODS", "DEFAULT_WINDOW"]

#: the decoding methods for token ids (the registry's, ``mmspec.drafting.available_methods()``)
METHODS = tuple(available_methods())
#: tokens verified per target forward (anchor + drafts) when ``window`` is not given
DEFAULT_WINDOW = {m: method_spec(m).default_window for m in METHODS}


@dataclass
class GenerateOutput:
    """Result of ``mmspec.generate``.

    Attributes:
        sequences: LongTensor [B, T + new]: the prompt (left padding kept) and the new tokens, rows that
            finished early padded with ``pad_token_id``, as transformers' ``generate`` returns them.
        stats: ``mmspec.decoding.GenerationStats``.
        lossless: whether the acceptance criterion preserves the target distribution.
    """

    sequences: torch.Tensor
    stats: GenerationStats
    lossless: bool = True


def _as_id_list(value, name):
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    if isinstance(value, int):
        value = [value]
    try:
        ids = [int(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be an int or a list of ints, got {value!r}.") from None
    return ids


def _check_model_kwargs(model, model_kwargs: dict) -> None:
    """Refuse keyword arguments that neither ``generate`` nor the model's forward takes (as transformers' ``generate``
    does): a misspelled ``temprature=`` or an unsupported ``num_beams=`` would otherwise reach the model silently."""
    used = set()
    for fn in (getattr(model, "forward", None), getattr(model, "prepare_inputs_for_generation", None)):
        if fn is not None:
            used |= {name for name, p in inspect.signature(fn).parameters.items()
                     if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    unused = sorted(k for k, v in model_kwargs.items() if v is not None and k not in used)
    if unused:
        raise ValueError(f"mmspec.generate got keyword arguments that neither it nor {type(model).__name__}.forward "
                         f"uses: {unused} (check for typos; see help(mmspec.generate) for its arguments).")


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int,
    method: str = "jacobi",
    draft_model=None,
    window: int | None = None,
    acceptance="exact",
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator=None,
    eos_token_id=None,
    pad_token_id: int | None = None,
    init: str = "random",
    coupled: bool = False,
    adaptive: bool = False,
    draft_confidence: float | None = None,
    max_ngram: int = 3,
    lookup_match: str = "longest",
    skip=None,
    lookahead=None,
    logits_processor=None,
    progress: bool = False,
    kernels: str = "auto",
    tree=None,
    cache: str | None = None,
    compile: bool = False,
    **model_kwargs,
) -> GenerateOutput:
    """Generate with speculative decoding; greedy output equals ``model.generate(do_sample=False)``.

    Args:
        model: any transformers decoder-only causal LM as loaded by ``from_pretrained`` (no wrapping).
        input_ids: LongTensor [B, T] (or [T]), left padded when prompts differ in length.
        attention_mask: [B, T] 1 for tokens, 0 for left padding; all ones when None.
        max_new_tokens: most tokens to add per row (>= 0).
        method: a registered decoding method (``mmspec.drafting.available_methods()``, also ``METHODS``):
            ``"jacobi"`` (the target drafts for itself), ``"draft"`` (a draft model proposes), ``"lookup"``
            (n-gram match in the context), or ``"ar"`` (plain decoding through the same loop). The pipelines and
            the CLI take the same names, as ``method=`` (or its alias ``decoding=``).
        draft_model: the drafter for ``method="draft"``; same vocabulary as ``model``.
        window: tokens verified per target forward, anchor included (``window - 1`` drafts);
            defaults per method: ``DEFAULT_WINDOW``. For ``adaptive`` drafting it is the cap.
        acceptance: a criterion name (``mmspec.acceptance.available()``) or object; ``"exact"`` is lossless.
        do_sample, temperature, top_k, top_p: as in transformers; greedy when ``do_sample=False``.
        generator: a ``torch.Generator`` or a list with one per row; every random draw comes from it. With
            one per row, a row gives the same tokens alone as in any batch (every method).
        eos_token_id: int or list; defaults to ``model.generation_config.eos_token_id``. Rows stop
            independently at EOS (kept) or at ``max_new_tokens``.
        pad_token_id: fills finished rows; defaults to the generation config's, else the first EOS id.
        init: Jacobi init strategy for new window slots (``"random"``, ``"repeat"``, ...).
        coupled: Jacobi coupled redraw of continuing slots (sampling only).
        adaptive: draft-model length schedule, per row (+2 on full acceptance, else -1).
        draft_confidence: a row stops drafting a step once the draft's top probability is under this value;
            the step's drafting ends when every active row has (one host sync per draft token), None to
            always draft ``window - 1``.
        max_ngram: longest n-gram for ``lookup``.
        lookup_match: which occurrence ``lookup`` continues: ``"longest"`` (the longest continuation, then the
            latest; default) or ``"earliest"`` (transformers' prompt-lookup rule: with ``max_ngram=2`` the same
            drafts as ``model.generate(prompt_lookup_num_tokens=window - 1)``).
        skip: decoder layers the target skips to draft for itself (``method="self"``); None calibrates them on
            the prompts (``mmspec.drafting.layer_skip.calibrate_skip``, cached per model).
        lookahead: ``(window, ngram, pool)`` for ``method="lookahead"`` (``mmspec.drafting.lookahead``).
        logits_processor: transformers ``LogitsProcessorList`` (or callables) applied to target and draft
            scores alike, before temperature/top-k/top-p.
        progress: show a tqdm bar over new tokens.
        kernels: verification backend: ``"auto"`` (fused Triton kernels for CUDA tensors, else torch; the
            ``MMSPEC_KERNELS`` environment variable may force either), ``"triton"`` or ``"torch"``; see
            ``mmspec.kernels``. Logits processors always take the torch path.
        tree: ``(width, depth)`` to verify a token tree per step instead of a chain (None): ``jacobi`` adds
            ``width - 1`` alternatives from the stale rows at each of the first ``depth`` slots (SJD-PAC),
            ``draft`` grows an EAGLE-2-style tree of ``depth`` levels (the draft expands its ``width`` best nodes per
            level, ``width`` children each, and the ``window - 1`` best nodes are verified), ``lookup`` verifies
            ``width`` n-gram continuations of up to ``depth`` tokens as sibling branches. ``window`` stays the
            number of tokens per target forward, the tree's nodes included.
        cache: the target's (and draft's) KV cache: ``"dynamic"`` (a growing transformers ``DynamicCache``; the
            default without ``compile``) or ``"static"`` (preallocated for the run, per-row lengths, rollback by
            moving them: ``mmspec.models.static_cache``; the default with ``compile``). Same tokens either way.
        compile: run the target's and the draft model's window forwards through ``torch.compile`` on the static
            cache (one compiled shape per window size; CUDA graphs on CUDA), see ``mmspec.compile``. The first call
            pays the compilation.
        **model_kwargs: the processor's other outputs (``pixel_values``, ``image_sizes``, ``image_grid_thw``,
            ...), passed to the target's prefill forward only, and to the draft's prefill when the draft is a
            vision-language model too (it must then share the processor); a text-only draft sees the prompt
            ids alone. VLMs are driven by ``mmspec.models.vlm.VisionLM``. A keyword argument that neither
            ``generate`` nor the model's ``forward`` takes (a typo such as ``temprature=``, or ``num_beams=``)
            raises a ``ValueError`` naming it, as in transformers.

    Returns:
        ``GenerateOutput`` with ``sequences`` [B, T + new] and ``stats``.
    """
    check_int(max_new_tokens, "max_new_tokens", 0)
    check_int(max_ngram, "max_ngram", 1)
    if method == "lookahead":
        lookahead, window = lookahead_config(lookahead, window)
    elif lookahead is not None:
        raise ValueError(f"`lookahead` is only used with method='lookahead', not method={method!r}.")
    tree = parse_tree(tree)
    if tree is not None and method not in TREE_METHODS:
        raise ValueError(f"`tree` needs drafts to branch: use it with method in {TREE_METHODS}, not "
                         f"method={method!r}.")
    if lookup_match != "longest" and method != "lookup":
        raise ValueError(f"`lookup_match` is only used with method='lookup', not method={method!r}.")
    if skip is not None and method != "self":
        raise ValueError(f"`skip` is only used with method='self', not method={method!r}.")
    choice = check_decoding(method, window=window, draft_model=draft_model, acceptance=acceptance,
                            do_sample=do_sample, init=init)
    criterion = choice.criterion
    if draft_confidence is not None and not 0.0 <= draft_confidence <= 1.0:
        raise ValueError(f"`draft_confidence` must be in [0, 1] or None, got {draft_confidence!r}.")
    _check_model_kwargs(model, model_kwargs)
    # the static cache reserves the run's budget after the prompt: new tokens, plus a window of drafts beyond them
    options = cache_options(cache, compile, reserve=max_new_tokens + 2 * (choice.window or 64) + 2)
    target = adapter_for(model, **options)
    V = target.vocab_size
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError("`input_ids` must be an integer torch.Tensor of shape [B, T].")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"`input_ids` must have shape [B, T] with T >= 1, got {tuple(input_ids.shape)}.")
    input_ids = input_ids.long().to(target.device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.dim() == 1:
        attention_mask = attention_mask.unsqueeze(0)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"`attention_mask` shape {tuple(attention_mask.shape)} differs from `input_ids` {tuple(input_ids.shape)}."
        )
    attention_mask = attention_mask.to(target.device).long()
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= V:
        raise ValueError(f"`input_ids` must lie in [0, {V}) for this model's vocabulary; found ids in [{lo}, {hi}].")
    if not bool(attention_mask[:, -1].all()) or bool((attention_mask.diff(dim=1) < 0).any()):
        raise ValueError("`attention_mask` must be left padded (0s then 1s in every row, last column all 1s).")
    check_generator(generator, input_ids.shape[0])

    gen_config = getattr(model, "generation_config", None)
    eos_ids = _as_id_list(eos_token_id if eos_token_id is not None else getattr(gen_config, "eos_token_id", None),
                          "eos_token_id")
    if pad_token_id is None:
        pad_token_id = getattr(gen_config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos_ids[0] if eos_ids else 0

    pipeline = LogitsPipeline(do_sample, temperature, top_k, top_p, processors=logits_processor or ())

    draft = None
    if draft_model is not None:
        if vocab_size_of(draft_model) != V:
            raise ValueError(
                f"`draft_model` has a vocabulary of {vocab_size_of(draft_model)} logits but the target has {V}; "
                "draft and target must share the tokenizer."
            )
        draft = adapter_for(draft_model, **options)
    # A VLM drafter sees the same processor outputs as the target (same placeholder layout); a text-only drafter
    # sees the prompt ids alone, image placeholders as ordinary tokens.
    draft_kwargs = model_kwargs if draft_model is not None and is_vision_language_model(draft_model) else {}
    proposer, window = make_proposer(method, choice.window, draft=draft, init=init, coupled=coupled,
                                     adaptive=adaptive, draft_confidence=draft_confidence, max_ngram=max_ngram,
                                     lookup_match=lookup_match, prefill_kwargs=model_kwargs if method == "self" else draft_kwargs,
                                     model=model, prompt=(input_ids, attention_mask), skip=skip,
                                     lookahead=lookahead, greedy=not do_sample, tree=tree)
    state = DecodeState(input_ids, attention_mask, max_new_tokens, V, pipeline, generator, target.device,
                        eos_token_ids=torch.tensor(eos_ids, dtype=torch.long) if eos_ids else None)
    state, stats = decode(target, proposer, state, window=window, criterion=criterion, model_kwargs=model_kwargs,
                          progress=progress, kernels=kernels)
    T = input_ids.shape[1]
    new = int(state.num_new.max()) if state.batch_size else 0
    sequences = state.tokens[:, : T + new].clone()
    filled = torch.arange(T + new).unsqueeze(0) < state.lengths.unsqueeze(1)
    sequences[~filled] = pad_token_id
    sequences[:, :T] = input_ids.cpu()
    return GenerateOutput(sequences.to(input_ids.device), stats, criterion.lossless)
