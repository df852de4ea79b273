"""The bundled text LM pair and the class-conditional LlamaGen model: offline loading, shapes, exactness."""

import json

import torch

import mmspec
from mmspec.zoo import hub
from mmspec.zoo.data import NATURAL_CLASSES
from mmspec.zoo.models import load_c2i_pipeline, load_text_pair, text_prompts


def test_text_pair_loads_offline_and_shares_the_tokenizer():
    target, draft, tok = load_text_pair()
    assert target.config.vocab_size == draft.config.vocab_size == len(tok)
    assert sum(p.numel() for p in draft.parameters()) < sum(p.numel() for p in target.parameters()) / 2
    ids = tok("def f(x):\n    return x", return_tensors="pt").input_ids
    assert target(ids).logits.shape == (1, ids.shape[1], len(tok))
    assert tok.decode(ids[0]) == "def f(x):\n    return x"  # byte-level BPE round-trips code exactly
    for name in ("text_target", "text_draft"):
        metrics = json.loads((hub.WEIGHTS_DIR / name / "metrics.json").read_text())
        assert metrics["heldout_loss"] < 6.0  # far below uniform (ln 4096 = 8.3): really trained


def test_text_prompts_are_heldout_and_fixed_length():
    _, _, tok = load_text_pair()
    p = text_prompts(tok, 3, 24)
    assert p.shape == (3, 24) and p.dtype == torch.long
    assert torch.equal(p, text_prompts(tok, 3, 24))


def test_text_pair_draft_and_lookup_are_exact_in_a_ragged_batch():
    target, draft, tok = load_text_pair()
    enc = tok(["import os", "def add(a, b):\n    return", "class"], return_tensors="pt", padding=True)
    kw = dict(attention_mask=enc.attention_mask, max_new_tokens=16, pad_token_id=tok.pad_token_id)
    ref = target.generate(enc.input_ids, do_sample=False, **kw)
    for method, extra in (("draft", {"draft_model": draft}), ("lookup", {})):
        out = mmspec.generate(target, enc.input_ids, method=method, eos_token_id=target.config.eos_token_id,
                              **kw, **extra)
        assert torch.equal(out.sequences[:, : ref.shape[1]], ref), method


def test_c2i_model_loads_and_jacobi_equals_ar():
    pipe = load_c2i_pipeline()
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.model.config
    assert cfg.model_type == "c2i" and cfg.num_classes == len(NATURAL_CLASSES) and cfg.block_size == 256
    kw = dict(class_labels=[0, 5], guidance_scale=2.0, do_sample=False, output_type="pt")
    ar = pipe(decoding="ar", **kw)
    jac = pipe(decoding="jacobi", init="vertical", window=16, **kw)
    assert ar.images.shape == (2, 3, 64, 64)
    assert torch.equal(ar.tokens, jac.tokens) and jac.stats.target_forwards < ar.stats.target_forwards
    metrics = json.loads((hub.WEIGHTS_DIR / "c2i" / "metrics.json").read_text())
    assert metrics["heldout_loss"] < 6.5  # below uniform over 1024 codes (6.93)


def test_c2i_sample_grid(tmp_path):
    """The card's picture: one row per class (crop, reconstruction, two samples), written as a PNG."""
    from PIL import Image

    from mmspec.zoo.recipes.c2i import sample_grid

    path = sample_grid(tmp_path / "grid.png", classes=(1, 3))
    with Image.open(path) as im:
        w, h = im.size
    assert path.exists() and w > 600 and 300 < h < 600  # 2 rows of 4 panels at 100 dpi
