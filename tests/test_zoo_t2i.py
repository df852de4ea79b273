"""The zoo's text-to-image token models: recipe smoke run, and (when bundled) the shipped weights."""

import os

import pytest
import torch

from mmspec.zoo import hub

HAS_VQ = (hub.WEIGHTS_DIR / "vq" / "config.json").is_file()
HAS_T2I = all((hub.WEIGHTS_DIR / n / "config.json").is_file() for n in ("t2i_target", "t2i_draft"))


@pytest.mark.skipif(not HAS_VQ, reason="bundled VQ tokenizer not present")
def test_t2i_recipe_smoke(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmspec.pipelines import SpeculativeImagePipeline
    from mmspec.zoo.recipes import t2i

    metrics = t2i.train(tmp_path, role="draft", minutes=5, max_steps=1, threads=1)
    assert metrics["steps"] == 1 and metrics["mean_token_entropy_nats"] > 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok("a red circle")["input_ids"][0] == 1  # <bos> first
    pipe = SpeculativeImagePipeline(model=model, vq=hub.load_vq(), tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a small red circle at the center on a plain blue background", window=8, output_type="pil",
               generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (64, 64) and out.tokens.shape == (1, 256)


@pytest.mark.skipif(not HAS_T2I, reason="bundled text-to-image models not present")
def test_bundled_t2i_models_are_exact_and_load_offline():
    from mmspec.zoo.models import load_image_pipeline

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    pipe, draft = load_image_pipeline(dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a large green square at the top right on a striped gray background",
               "a small red circle at the bottom left on a plain white background"]
    kw = dict(do_sample=False, output_type="latent", guidance_scale=3.0)
    ar = pipe(prompts, decoding="ar", **kw)
    jac = pipe(prompts, decoding="jacobi", init="vertical", window=16, **kw)
    dr = pipe(prompts, decoding="draft", draft_model=draft, window=5, **kw)
    assert torch.equal(ar.tokens, jac.tokens) and torch.equal(ar.tokens, dr.tokens)
    assert jac.stats.target_forwards < ar.stats.target_forwards
