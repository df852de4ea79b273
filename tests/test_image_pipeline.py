"""The image pipeline: speculative image-token decoding equals AR decoding; guidance is exact."""

import numpy as np
import PIL.Image
import pytest
import torch

import mmspec
from mmspec.models.families import family_for
from mmspec.models.image_tokens import EOL, ImageLayout
from mmspec.pipelines import SpeculativeImagePipeline

from image_fixtures import tiny_image_lm, tiny_pipeline, tiny_tokenizer, tiny_vq
from utils_stats import all_outcomes, chi2_pvalue, guided_sequence_law, outcome_counts

PROMPTS = ["a red circle", "a blue square on green background", "green"]


def naive_guided_greedy(model, family, prompts, scale):
    """Reference: recompute the whole sequence every step (no cache), guide, force structure, argmax."""
    inputs = family.prefill_inputs(prompts)
    layout = family.layout()
    allowed = layout.allowed(model.config.vocab_size)
    rows = []
    for b in range(len(prompts)):
        cond = inputs["input_ids"][b][inputs["attention_mask"][b].bool()].tolist()
        uncond = inputs["uncond_input_ids"][b][inputs["uncond_attention_mask"][b].bool()].tolist()
        new = []
        for t in range(layout.num_tokens):
            with torch.no_grad():
                c = model(torch.tensor([cond + new])).logits[0, -1]
                u = model(torch.tensor([uncond + new])).logits[0, -1]
            g = u + scale * (c - u)
            g = g.masked_fill(~allowed[layout.kind(torch.tensor(t))], float("-inf"))
            new.append(int(g.argmax()))
        rows.append(new)
    return layout.to_grid(torch.tensor(rows))


@pytest.fixture(scope="module", params=[False, True], ids=["grid", "grid+eol"])
def pipe(request):
    return tiny_pipeline(eol=request.param)


def test_ar_path_equals_naive_reference(pipe):
    ref = naive_guided_greedy(pipe.model, pipe.family, PROMPTS, 3.0)
    out = pipe(PROMPTS, do_sample=False, decoding="ar", guidance_scale=3.0, output_type="pt")
    assert torch.equal(out.tokens, ref)


@pytest.mark.parametrize("kwargs", [
    dict(decoding="jacobi", init="random", window=6),
    dict(decoding="jacobi", init="horizontal", window=16),
    dict(decoding="jacobi", init="vertical", window=9),
    dict(decoding="jacobi", init="sample_horizon", window=5, coupled=True),
    dict(decoding="draft", window=4, draft="other"),
    dict(decoding="draft", window=6, draft="self"),
])
def test_greedy_speculative_equals_ar(pipe, kwargs):
    kwargs = dict(kwargs)
    draft = kwargs.pop("draft", None)
    if draft == "other":
        kwargs["draft_model"] = tiny_image_lm(seed=5, eol=pipe.family.layout().eol_token_id is not None)
    elif draft == "self":
        kwargs["draft_model"] = pipe.model
    ref = pipe(PROMPTS, do_sample=False, decoding="ar", guidance_scale=2.5, output_type="pt")
    out = pipe(PROMPTS, do_sample=False, guidance_scale=2.5, output_type="pt",
               generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(out.tokens, ref.tokens)
    if draft == "self":
        assert out.stats.target_forwards < ref.stats.target_forwards / 2


def test_rows_alone_equal_rows_in_batch():
    pipe = tiny_pipeline()
    batch = pipe(PROMPTS, do_sample=False, decoding="jacobi", init="vertical", window=8, output_type="pt")
    for i, p in enumerate(PROMPTS):
        alone = pipe(p, do_sample=False, decoding="jacobi", init="vertical", window=8, output_type="pt")
        assert torch.equal(alone.tokens[0], batch.tokens[i])


def test_cond_and_uncond_rows_never_diverge():
    pipe = tiny_pipeline()
    seen = {}

    def spy(p, step, n, kw):
        seen["step"] = step

    from mmspec.models import image_tokens

    original = image_tokens.GuidedLM.rollback

    def checked(self, keep):
        original(self, keep)
        mask = self.inner._mask_cpu
        start = self.inner._start - keep.max()
        B = keep.shape[0]
        assert torch.equal(mask[:B, start:], mask[B:, start:])

    image_tokens.GuidedLM.rollback = checked
    try:
        pipe(PROMPTS, do_sample=True, decoding="jacobi", window=6, generator=torch.Generator().manual_seed(0),
             callback_on_step_end=spy)
    finally:
        image_tokens.GuidedLM.rollback = original
    assert seen["step"] > 0


def exact_guided_distribution(model, family, prompt, scale, temperature):
    """P(codes) of every code grid (guided, tempered); returns probs [C^n] and the grids' codes [C^n, n]."""
    layout = family.layout()
    inputs = family.prefill_inputs([prompt])
    cond = inputs["input_ids"][0].tolist()
    uncond = inputs["uncond_input_ids"][0][inputs["uncond_attention_mask"][0].bool()].tolist()
    n = layout.height * layout.width
    lo, hi = layout.token_range
    codes = all_outcomes(hi - lo, n)
    return guided_sequence_law(model, cond, uncond, codes + lo, torch.arange(n), (lo, hi), scale, temperature), codes


@pytest.mark.slow
@pytest.mark.parametrize("decoding,kw", [("ar", {}), ("jacobi", dict(window=4)),
                                         ("jacobi", dict(window=4, init="vertical", coupled=True)),
                                         ("draft", dict(window=3)), ("jacobi", dict(window=7, tree=(2, 2))),
                                         ("draft", dict(window=7, tree=(2, 2))),
                                         ("draft", dict(window=5, tree=(3, 3)))])
def test_exact_with_guidance_is_lossless(decoding, kw):
    """2x2 grid, 4 codes: 256 outcomes enumerated exactly vs 20,000 samples; chi-square at alpha = 0.001."""
    model = tiny_image_lm(grid=2, codes=4, sharpen=2.0, hidden=16, dtype=torch.float32)
    pipe = SpeculativeImagePipeline(model=model, vq=tiny_vq(codes=4), tokenizer=tiny_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    scale, temp, N = 2.0, 0.9, 20_000
    probs, _ = exact_guided_distribution(model, pipe.family, "a red circle", scale, temp)
    if decoding == "draft":
        kw = dict(kw, draft_model=tiny_image_lm(grid=2, codes=4, sharpen=2.0, hidden=16, seed=3, dtype=torch.float32))
    out = pipe("a red circle", num_images_per_prompt=N, guidance_scale=scale, temperature=temp, decoding=decoding,
               generator=torch.Generator().manual_seed(0), output_type="latent", **kw)
    assert torch.equal(out.images.flatten(1), out.tokens)
    if decoding != "ar":
        assert out.stats.step_compression > 1.0
    assert chi2_pvalue(outcome_counts(out.tokens, 4), probs) > 1e-3


def test_relaxed_criteria_degenerate_to_exact():
    pipe = tiny_pipeline()
    kw = dict(do_sample=True, decoding="jacobi", window=6, output_type="pt")
    exact = pipe(PROMPTS, acceptance="exact", generator=torch.Generator().manual_seed(3), **kw)
    lantern = pipe(PROMPTS, acceptance=mmspec.acceptance.get("lantern", k=4, delta=0.0),
                   generator=torch.Generator().manual_seed(3), **kw)
    gsd = pipe(PROMPTS, acceptance=mmspec.acceptance.get("gsd", group_size=1),
               generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(exact.tokens, lantern.tokens) and torch.equal(exact.tokens, gsd.tokens)
    assert exact.lossless and not lantern.lossless and not gsd.lossless
    relaxed = pipe(PROMPTS, acceptance=mmspec.acceptance.get("lantern", k=4, delta=0.5),
                   generator=torch.Generator().manual_seed(3), **kw)
    assert relaxed.stats.mean_accepted >= exact.stats.mean_accepted


def test_outputs_and_reproducibility():
    pipe = tiny_pipeline()
    out = pipe(PROMPTS[:2], num_images_per_prompt=2, generator=torch.Generator().manual_seed(1))
    assert len(out.images) == 4 and all(isinstance(im, PIL.Image.Image) and im.size == (16, 16) for im in out.images)
    assert out.tokens.shape == (4, 16) and out.tokens.min() >= 0 and out.tokens.max() < 16
    again = pipe(PROMPTS[:2], num_images_per_prompt=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.tokens, again.tokens)
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(again.images[0]))
    arr = pipe("a red circle", output_type="np").images
    assert arr.shape == (1, 16, 16, 3) and arr.min() >= 0 and arr.max() <= 1
    images, tokens, stats = pipe("a red circle", output_type="pt", return_dict=False)
    assert images.shape == (1, 3, 16, 16) and stats.new_tokens == 17


@pytest.mark.parametrize("kwargs,match", [
    (dict(decoding="beam"), "unknown `decoding`"),
    (dict(window=0), "`window`"),
    (dict(init="zigzag"), "unknown Jacobi `init`"),
    (dict(class_labels=[3]), "text-conditioned"),
    (dict(guidance_scale=-1.0), "`guidance_scale`"),
    (dict(output_type="jpeg"), "`output_type`"),
    (dict(num_images_per_prompt=0), "`num_images_per_prompt`"),
    (dict(decoding="draft"), "needs a `draft_model`"),
    (dict(acceptance="gsd", do_sample=False), "needs sampling"),
    (dict(generator=[torch.Generator()] * 5), "generators"),
])
def test_bad_arguments(kwargs, match):
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match=match):
        pipe("a red circle", **kwargs)
    with pytest.raises(ValueError, match="`prompt`"):
        pipe(None)


def test_save_and_load(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path)
    again = SpeculativeImagePipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    kw = dict(do_sample=False, output_type="pt")
    assert torch.equal(pipe("a red circle", **kw).tokens, again("a red circle", **kw).tokens)


def test_layout_structure():
    layout = ImageLayout(height=2, width=3, image_token_offset=10, codebook_size=5, eol_token_id=1, eoi_token_id=2)
    assert layout.row_stride == 4 and layout.num_tokens == 9
    kinds = layout.kind(torch.arange(10)).tolist()
    assert kinds == [0, 0, 0, EOL, 0, 0, 0, EOL, 2, 3]
    span = torch.tensor([[10, 11, 12, 1, 13, 14, 10, 1, 2]])
    assert layout.to_grid(span).tolist() == [[0, 1, 2, 3, 4, 0]]
    with pytest.raises(TypeError, match="no image-generation family"):
        family_for(torch.nn.Linear(1, 1))
