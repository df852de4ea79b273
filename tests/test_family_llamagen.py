"""LlamaGen through SpeculativeImagePipeline: c2i (class labels) and t2i (caption features) with guidance.

The family contract (tests/family_contract.py) runs for both variants; its AR reference is ``llamagen_generate``
(LlamaGen's own ``generate``: prefill of the condition, one token per forward, CFG with conditional rows first)
with ``top_k=1``. The negative-caption case (which LlamaGen's sampler has no argument for) uses a naive loop
that recomputes everything each step. Models are tiny, float64, random (no downloads).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mmspec.models import llamagen as lg  # noqa: E402
from mmspec.models import llamagen_family  # noqa: E402,F401  (registers the family)
from mmspec.models.families import family_for  # noqa: E402
from mmspec.models.llamagen_family import LlamaGenFamily, caption_mask  # noqa: E402
from mmspec.pipelines import SpeculativeImagePipeline  # noqa: E402

from family_contract import FamilyContract  # noqa: E402

NODROP = dict(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, attn_dropout_p=0.0)
BASE = dict(dim=32, n_layer=2, n_head=4, n_kv_head=2, vocab_size=16, block_size=16, multiple_of=16, **NODROP)
KINDS = {"c2i": dict(model_type="c2i", num_classes=5), "t2i": dict(model_type="t2i", caption_dim=12, cls_token_num=3)}
VQ = dict(codebook_size=16, codebook_embed_dim=4, encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2], z_channels=8, ch=32)
SCALE = 3.0


def tiny_gpt(kind, seed=0, sharpen=3.0, **over):
    """A random LlamaGen GPT whose condition matters (LlamaGen's own init zeroes the head and is near-flat)."""
    torch.manual_seed(seed)
    model = lg.LlamaGenGPT(**{**BASE, **KINDS[kind], **over})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 if "embedding" in name else p.shape[1] ** -0.5)
        model.output.weight.mul_(sharpen)
    return model.double().eval()


def tiny_vq(seed=0):
    torch.manual_seed(seed)
    return lg.LlamaGenVQ(**VQ).eval()


def make_pipe(kind, **over):
    pipe = SpeculativeImagePipeline(model=tiny_gpt(kind, **over), vq=tiny_vq())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def caption(seed=0, batch=2, tokens=5, pad=(1, 0)):
    """Random caption features [B, tokens, 12]; row b has its first pad[b] tokens zeroed (LlamaGen's
    left padding, ``caption_embs * emb_masks``)."""
    emb = torch.randn(batch, tokens, 12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for b, n in enumerate(pad):
        emb[b, :n] = 0
    return emb


LABELS = [1, 3]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only contend on a shared CPU (a 2-thread SDPA call is ~100x slower
    than a 1-thread one there). Restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def condition(kind):
    """(pipeline kwargs, llamagen_generate kwargs) for a batch of two different conditions."""
    if kind == "c2i":
        return dict(class_labels=LABELS), dict(cond=torch.tensor(LABELS))
    emb = caption()
    return dict(prompt_embeds=emb), dict(cond=emb, emb_masks=caption_mask(emb[:, :3]))


# ------------------------------------------------------------------------------------------------------
# the family contract, once per variant
# ------------------------------------------------------------------------------------------------------


class LlamaGenContract(FamilyContract):
    kind: str
    family_class = LlamaGenFamily
    guidance_scale = SCALE
    reference_scales = (SCALE, 1.0)
    pixel_size = (8, 8)
    speculative_cases = {
        "jacobi-random": dict(decoding="jacobi", init="random", window=6),
        "jacobi-vertical": dict(decoding="jacobi", init="vertical", window=9),
        "jacobi-vertical-w16": dict(decoding="jacobi", init="vertical", window=16, coupled=True),
        "draft-other": dict(decoding="draft", window=4, draft="other"),
        "draft-self": dict(decoding="draft", window=6, draft="self"),
    }

    @pytest.fixture(scope="class")
    @classmethod
    def pipe(cls):
        return make_pipe(cls.kind)

    def conditions(self, pipe):
        return condition(self.kind)[0]

    def reference_tokens(self, pipe, scale):
        return lg.llamagen_generate(pipe.model, max_new_tokens=16, cfg_scale=scale, top_k=1, **condition(self.kind)[1])

    def make_draft(self, pipe, name):
        return tiny_gpt(self.kind, seed=5) if name == "other" else super().make_draft(pipe, name)

    def check_speculative(self, pipe, name, out, ar):
        if name == "draft-self":
            assert out.stats.target_forwards <= ar.stats.target_forwards // 2


class TestLlamaGenC2I(LlamaGenContract):
    kind = "c2i"
    bad_inputs = {
        "prompt": (dict(prompt="a cat"), "class-conditional"),
        "negative-prompt": (dict(class_labels=[1], negative_prompt="dog"), "class-conditional"),
        "prompt-embeds": (dict(prompt_embeds=torch.zeros(1, 3, 12)), "class-conditional"),
        "nothing": (dict(), "pass `class_labels`"),
        "label-range": (dict(class_labels=[5]), r"\[0, 4\]"),
    }


class TestLlamaGenT2I(LlamaGenContract):
    kind = "t2i"
    bad_inputs = {
        "class-labels": (dict(class_labels=[1]), "caption-conditioned"),
        "prompt": (dict(prompt="a cat"), "caption-conditioned"),
        "nothing": (dict(), "pass `prompt_embeds`"),
        "caption-dim": (dict(prompt_embeds=torch.zeros(1, 3, 7)), "caption_dim=12"),
        "too-short": (dict(prompt_embeds=torch.ones(1, 2, 12)), "cls_token_num=3"),
        "negative-count": (dict(prompt_embeds=torch.ones(2, 3, 12), negative_prompt_embeds=torch.ones(1, 3, 12)),
                           "negative"),
    }


# ------------------------------------------------------------------------------------------------------
# LlamaGen specifics
# ------------------------------------------------------------------------------------------------------


def naive_guided_greedy(model, cond, cond_mask, uncond, uncond_mask, n, scale):
    """Full recompute every step, no cache: guided argmax with separate conditional / unconditional runs."""
    ids = torch.zeros(cond.shape[0], 0, dtype=torch.long)
    for _ in range(n):
        ones = torch.ones(cond.shape[0], ids.shape[1], dtype=torch.long)
        c = model(input_ids=ids, cond=cond, attention_mask=torch.cat([cond_mask, ones], 1), use_cache=False)
        u = model(input_ids=ids, cond=uncond, attention_mask=torch.cat([uncond_mask, ones], 1), use_cache=False)
        c, u = c.logits[:, -1], u.logits[:, -1]
        ids = torch.cat([ids, (u + scale * (c - u)).argmax(-1, keepdim=True)], 1)
    return ids


def test_t2i_negative_prompt_embeds_equals_naive_reference():
    pipe = make_pipe("t2i")
    emb, neg = caption(seed=1, pad=(2, 0)), caption(seed=2, pad=(0, 1))
    out = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, do_sample=False, decoding="ar", guidance_scale=SCALE,
               output_type="latent")
    ref = naive_guided_greedy(pipe.model, emb[:, :3], caption_mask(emb[:, :3]), neg[:, :3], caption_mask(neg[:, :3]),
                              16, SCALE)
    assert torch.equal(out.tokens, ref)
    jac = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, do_sample=False, decoding="jacobi", init="vertical",
               window=6, guidance_scale=SCALE, output_type="latent")
    assert torch.equal(jac.tokens, ref)


def test_relaxed_criteria_get_the_vq_codebook():
    pipe = make_pipe("c2i")
    assert torch.equal(pipe.family.codebook(), pipe.vq.quantize.embedding.weight)


def test_images_decoded_with_llamagen_vq():
    """Pixels are the LlamaGen VQ's decode of the codes (shapes and ranges are in the contract)."""
    pipe = make_pipe("c2i")
    pt = pipe(class_labels=3, do_sample=False, output_type="pt")
    expected = (pipe.vq.decode_code(pt.tokens, (1, 4, 4, 4)).clamp(-1, 1) + 1) / 2
    assert pt.images.shape == (1, 3, 8, 8) and torch.allclose(pt.images, expected.float())
    arr = pipe(class_labels=[0], output_type="np").images
    assert arr.shape == (1, 8, 8, 3) and arr.min() >= 0 and arr.max() <= 1
    latent = pipe(prompt_embeds=None, class_labels=[2, 4], output_type="latent", do_sample=False)
    assert latent.images.shape == (2, 4, 4) and torch.equal(latent.images.flatten(1), latent.tokens)


def test_family_layout_and_conditioning():
    c2i, t2i = tiny_gpt("c2i"), tiny_gpt("t2i")
    fam = family_for(c2i, vq=tiny_vq())
    assert isinstance(fam, LlamaGenFamily) and fam.conditioning == "class"
    assert family_for(t2i).conditioning == "embeds"
    layout = fam.layout()
    assert (layout.height, layout.width, layout.image_token_offset, layout.codebook_size) == (4, 4, 0, 16)
    assert layout.eol_token_id is None and layout.eoi_token_id is None and layout.num_tokens == 16
    inputs = fam.prefill_inputs(class_labels=torch.tensor([1, 3]))
    assert inputs["input_ids"].shape == (2, 1) and inputs["attention_mask"].all()
    assert inputs["cond"].tolist() == [1, 3] and inputs["uncond_cond_drop"].all() and not inputs["cond_drop"].any()
    tin = family_for(t2i).prefill_inputs(prompt_embeds=caption(pad=(2, 0)))
    assert tin["input_ids"].shape == (2, 3) and tin["attention_mask"].tolist() == [[0, 0, 1], [1, 1, 1]]
    assert torch.equal(tin["uncond_attention_mask"], tin["attention_mask"])  # LlamaGen reuses emb_masks


# ------------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------------


def test_bad_models():
    pipe = make_pipe("t2i")
    other = tiny_gpt("t2i", cls_token_num=4)
    with pytest.raises(ValueError, match="cls_token_num"):
        pipe(prompt_embeds=caption(), decoding="draft", draft_model=other, output_type="latent")
    nonull = make_pipe("c2i", class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="no null class"):
        nonull(class_labels=[1], output_type="latent")
    assert nonull(class_labels=[1], guidance_scale=1.0, output_type="latent").tokens.shape == (1, 16)
    small_vq = SpeculativeImagePipeline(model=tiny_gpt("c2i", vocab_size=32), vq=tiny_vq())
    small_vq.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="codebook has 16 codes"):
        small_vq(class_labels=[1], output_type="pt")


# ------------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------------


def test_components_save_and_load(tmp_path):
    pipe = make_pipe("t2i")
    pipe.model.save_pretrained(tmp_path / "model")
    pipe.vq.save_pretrained(tmp_path / "vq")
    model = lg.LlamaGenGPT.from_pretrained(tmp_path / "model")
    vq = lg.LlamaGenVQ.from_pretrained(tmp_path / "vq", torch_dtype=torch.float64)
    assert model.dtype == torch.float64 and vq.quantize.embedding.weight.dtype == torch.float64
    again = SpeculativeImagePipeline(model=model, vq=vq)
    again.set_progress_bar_config(disable=True)
    kw = dict(prompt_embeds=caption(), do_sample=False, output_type="np")
    a, b = pipe(**kw), again(**kw)
    assert torch.equal(a.tokens, b.tokens) and np.allclose(a.images, b.images, atol=1e-6)


def test_pipeline_saved_by_mmspec_0_1_loads(tmp_path):
    """mmspec 0.1 saved LlamaGen components as ``model.safetensors`` with the config in the metadata (no
    ``config.json``) and named ``mmspec.models.llamagen`` as their library; such folders still load."""
    pipe = make_pipe("t2i")
    for name, save in (("model", lg.save_gpt), ("vq", lg.save_vq)):
        (tmp_path / name).mkdir()
        save(getattr(pipe, name), tmp_path / name / "model.safetensors")
    index = {"_class_name": "SpeculativeImagePipeline", "_diffusers_version": "0.42.1", "tokenizer": [None, None],
             "model": ["mmspec.models.llamagen", "LlamaGenGPT"], "vq": ["mmspec.models.llamagen", "LlamaGenVQ"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    again = SpeculativeImagePipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert again.model.config == pipe.model.config and again.model.dtype == torch.float64
    kw = dict(prompt_embeds=caption(), do_sample=False, output_type="latent")
    assert torch.equal(pipe(**kw).tokens, again(**kw).tokens)


def test_pipeline_folder_is_diffusers_format(tmp_path):
    """Components are saved by diffusers itself (config.json + weights), recorded by module path."""
    make_pipe("c2i").save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["model"] == ["mmspec.models.llamagen.gpt", "LlamaGenGPT"]
    assert index["vq"] == ["mmspec.models.llamagen.vq", "LlamaGenVQ"]
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["_class_name"] == "LlamaGenGPT" and config["model_type"] == "c2i" and config["num_classes"] == 5
    assert (tmp_path / "vq" / "diffusion_pytorch_model.safetensors").is_file()
