"""Greedy speculative decoding of vision-language models equals their own ``generate(do_sample=False)``.

Every family runs on its real transformers class (tiny random config, float64) with its real processor:
LLaVA, Qwen2-VL, Qwen2.5-VL (3-D multimodal rope), Idefics3 and SmolVLM (image splitting, padded image
counts), PaliGemma (1-indexed positions, bidirectional prefix), and LLaVA-NeXT, a family mmspec never names,
through the same adapter. Batches mix images of different sizes and prompts of different lengths.
"""

import pytest
import torch

import mmspec
from mmspec.models.vlm import VisionLM, adapter_for

from lm_fixtures import tiny_causal_lm
from vlm_fixtures import FAMILIES, family_batch

NEW = 12
_CACHE = {}


def family_model(family):
    if family not in _CACHE:
        build, _ = FAMILIES[family]
        _CACHE[family] = build(seed=0)
    return _CACHE[family]


def reference(family, batch):
    """(processor outputs, transformers' greedy sequences [B, T + NEW])."""
    key = (family, batch)
    if key not in _CACHE:
        model, processor = family_model(family)
        inputs = family_batch(family, processor, batch, seed=batch)
        ref = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
        _CACHE[key] = (inputs, ref)
    return _CACHE[key]


def text_draft(model):
    """A text-only drafter with the target's vocabulary (it sees the prompt ids, image placeholders included)."""
    V = mmspec.models.vocab_size_of(model)
    return tiny_causal_lm("llama", vocab_size=V, seed=3, sharpen=4.0)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_speculative_equals_generate(family, batch):
    model, _ = family_model(family)
    inputs, ref = reference(family, batch)
    inputs = dict(inputs)
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    draft = text_draft(model)
    runs = [("lookup", {}), ("jacobi", {"window": 4}), ("draft", {"draft_model": draft, "window": 4}),
            ("jacobi", {"window": 7, "tree": (2, 2)}), ("draft", {"draft_model": draft, "window": 7, "tree": (2, 2)})]
    for method, kw in runs:
        out = mmspec.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, method=method, **kw, **inputs)
        assert torch.equal(out.sequences, ref), f"{family} {method} batch {batch}"


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_vlm_draft_sees_the_images(family):
    """A small VLM drafter sharing the processor gets the pixel values too; output stays exact."""
    model, _ = family_model(family)
    build, _ = FAMILIES[family]
    draft, _ = build(seed=1)  # same processor layout, other weights
    inputs, ref = reference(family, 3)
    inputs = dict(inputs)
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    out = mmspec.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, method="draft", draft_model=draft,
                          window=4, **inputs)
    assert torch.equal(out.sequences, ref)
    assert out.stats.draft_forwards > 0


def _prefilled(family, batch=3):
    model, _ = family_model(family)
    inputs, _ = reference(family, batch)
    inputs = dict(inputs)
    lm = adapter_for(model)
    assert isinstance(lm, VisionLM)
    lm.prefill(inputs.pop("input_ids"), inputs.pop("attention_mask"), **inputs)
    return model, lm


def test_position_offsets_follow_each_models_layout():
    # LLaVA numbers text positions like a plain LM, PaliGemma from 1.
    assert _prefilled("llava")[1].position_offset.tolist() == [0, 0, 0]
    assert _prefilled("paligemma")[1].position_offset.tolist() == [1, 1, 1]
    # Qwen2-VL: one past the largest 3-D rope position, i.e. transformers' own rope_deltas, per row.
    model, lm = _prefilled("qwen2_vl")
    inputs, _ = reference("qwen2_vl", 3)
    _, deltas = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                           image_grid_thw=inputs["image_grid_thw"],
                                           attention_mask=inputs["attention_mask"])
    assert lm.position_offset.tolist() == deltas.flatten().tolist()
    assert len(set(deltas.flatten().tolist())) > 1  # rows differ: images of different sizes


def test_wrong_decode_positions_are_detected(monkeypatch):
    """Control: without the per-row offset Qwen2-VL's greedy text changes, so the equality tests can fail."""
    model, _ = family_model("qwen2_vl")
    inputs, ref = reference("qwen2_vl", 3)
    inputs = dict(inputs)
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    monkeypatch.setattr(VisionLM, "_offset", staticmethod(lambda positions, mask: torch.zeros_like(mask[:, 0])))
    out = mmspec.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, method="lookup", **inputs)
    assert not torch.equal(out.sequences, ref)


def test_text_models_keep_the_plain_adapter():
    lm = adapter_for(tiny_causal_lm("llama"))
    assert type(lm).__name__ == "CausalLM"
