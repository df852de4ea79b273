"""LlamaGen through SpeculativeImagePipeline: c2i (class labels) and t2i (caption features) with guidance.

The reference for the AR path is ``llamagen_generate`` (LlamaGen's own ``generate``: prefill of the condition,
one token per forward, CFG with conditional rows first) with ``top_k=1``; the negative-caption case (which
LlamaGen's sampler has no argument for) uses a naive loop that recomputes everything each step.
Models are tiny, float64, random (no downloads).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import mmspec  # noqa: E402
from mmspec.models import llamagen as lg  # noqa: E402
from mmspec.models import llamagen_family  # noqa: E402,F401  (registers the family)
from mmspec.models.families import family_for  # noqa: E402
from mmspec.models.llamagen_family import LlamaGenFamily, caption_mask  # noqa: E402
from mmspec.pipelines import SpeculativeImagePipeline  # noqa: E402

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


@pytest.fixture(scope="module", params=list(KINDS))
def pipe(request):
    return make_pipe(request.param)


def kind_of(pipe):
    return pipe.model.config.model_type


# ------------------------------------------------------------------------------------------------------
# the AR path equals LlamaGen's own generation
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [SCALE, 1.0])
def test_ar_equals_llamagen_generate(pipe, scale):
    kw, ref_kw = condition(kind_of(pipe))
    out = pipe(**kw, do_sample=False, decoding="ar", guidance_scale=scale, output_type="latent")
    ref = lg.llamagen_generate(pipe.model, max_new_tokens=16, cfg_scale=scale, top_k=1, **ref_kw)
    assert torch.equal(out.tokens, ref)
    assert not torch.equal(out.tokens[0], out.tokens[1])  # the conditions matter
    assert out.stats.target_forwards == 16


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


# ------------------------------------------------------------------------------------------------------
# greedy speculative paths equal the AR path
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(decoding="jacobi", init="random", window=6),
    dict(decoding="jacobi", init="vertical", window=9),
    dict(decoding="jacobi", init="vertical", window=16, coupled=True),
    dict(decoding="draft", window=4, draft="other"),
    dict(decoding="draft", window=6, draft="self"),
], ids=["jacobi-random", "jacobi-vertical", "jacobi-vertical-w16", "draft-other", "draft-self"])
def test_greedy_speculative_equals_ar(pipe, kwargs):
    kind = kind_of(pipe)
    kwargs = dict(kwargs)
    draft = kwargs.pop("draft", None)
    if draft == "other":
        kwargs["draft_model"] = tiny_gpt(kind, seed=5)
    elif draft == "self":
        kwargs["draft_model"] = pipe.model
    kw, _ = condition(kind)
    ref = pipe(**kw, do_sample=False, decoding="ar", guidance_scale=SCALE, output_type="latent")
    out = pipe(**kw, do_sample=False, guidance_scale=SCALE, output_type="latent",
               generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(out.tokens, ref.tokens)
    if draft == "self":
        assert out.stats.target_forwards <= ref.stats.target_forwards // 2


# ------------------------------------------------------------------------------------------------------
# sampling, outputs, LANTERN hook
# ------------------------------------------------------------------------------------------------------


def test_sampling_with_generator_list_is_reproducible(pipe):
    kw, _ = condition(kind_of(pipe))

    def run(seeds, **extra):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(**kw, guidance_scale=SCALE, output_type="latent", generator=gens, **extra).tokens

    jac = dict(decoding="jacobi", window=6, init="vertical")
    a = run([11, 12], **jac)
    assert torch.equal(a, run([11, 12], **jac))
    assert not torch.equal(a, run([13, 14], **jac))
    # AR sampling: each image depends only on its own generator
    batch = run([11, 12], decoding="ar")
    alone_kw = {k: v[1:] for k, v in kw.items()}
    alone = pipe(**alone_kw, guidance_scale=SCALE, output_type="latent", decoding="ar",
                 generator=[torch.Generator().manual_seed(12)]).tokens
    assert torch.equal(alone[0], batch[1])


def test_relaxed_criteria_get_the_vq_codebook():
    pipe = make_pipe("c2i")
    family = pipe.family
    assert torch.equal(family.codebook(), pipe.vq.quantize.embedding.weight)
    kw = dict(class_labels=LABELS, decoding="jacobi", window=6, output_type="latent")
    exact = pipe(**kw, generator=torch.Generator().manual_seed(3))
    lantern = pipe(**kw, acceptance=mmspec.acceptance.get("lantern", k=4, delta=0.0),
                   generator=torch.Generator().manual_seed(3))
    assert torch.equal(exact.tokens, lantern.tokens) and exact.lossless and not lantern.lossless


def test_images_decoded_with_llamagen_vq():
    pipe = make_pipe("c2i")
    out = pipe(class_labels=LABELS, num_images_per_prompt=2, generator=torch.Generator().manual_seed(1))
    assert len(out.images) == 4 and all(isinstance(im, PIL.Image.Image) and im.size == (8, 8) for im in out.images)
    assert out.tokens.shape == (4, 16) and out.tokens.min() >= 0 and out.tokens.max() < 16
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


@pytest.mark.parametrize("kind,kwargs,match", [
    ("c2i", dict(prompt="a cat"), "class-conditional"),
    ("c2i", dict(class_labels=[1], negative_prompt="dog"), "class-conditional"),
    ("c2i", dict(prompt_embeds=torch.zeros(1, 3, 12)), "class-conditional"),
    ("c2i", dict(), "pass `class_labels`"),
    ("c2i", dict(class_labels=[5]), r"\[0, 4\]"),
    ("t2i", dict(class_labels=[1]), "caption-conditioned"),
    ("t2i", dict(prompt="a cat"), "caption-conditioned"),
    ("t2i", dict(), "pass `prompt_embeds`"),
    ("t2i", dict(prompt_embeds=torch.zeros(1, 3, 7)), "caption_dim=12"),
    ("t2i", dict(prompt_embeds=torch.ones(1, 2, 12)), "cls_token_num=3"),
    ("t2i", dict(prompt_embeds=torch.ones(2, 3, 12), negative_prompt_embeds=torch.ones(1, 3, 12)), "negative"),
])
def test_bad_inputs(kind, kwargs, match):
    pipe = make_pipe(kind)
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs, output_type="latent")


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


def test_pipeline_save_and_load(tmp_path):
    pipe = make_pipe("c2i")
    pipe.save_pretrained(tmp_path)
    again = SpeculativeImagePipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    kw = dict(class_labels=LABELS, do_sample=False, output_type="latent")
    assert torch.equal(pipe(**kw).tokens, again(**kw).tokens)
