"""The contract every image-generation family passes through ``SpeculativeImagePipeline``.

As diffusers' ``PipelineTesterMixin``: a family's test file declares one class inheriting :class:`FamilyContract`,
provides a ``pipe`` fixture (module scoped, parametrised over the family's variants if it has any) and fills in
the hooks below; the shared checks then run for it. What is specific to a family (its reference generator, its
prompt format, its vocabulary) stays in that file as ordinary tests.

Hooks and attributes (see the four ``tests/test_family_*.py`` files for filled-in examples):

* ``family_class``: the ``ImageFamily`` subclass ``family_for`` must pick for the model.
* ``conditions(pipe)``: pipeline keyword arguments for a batch of at least two *different* conditions
  (prompts, class labels or caption features), each value a list or a tensor with one entry per row.
* ``reference_tokens(pipe, scale)``: the code grids [B, h * w] the family's *own* implementation generates
  greedily for ``conditions(pipe)`` (transformers' ``generate``, LlamaGen's sampler, ...).
* ``speculative_cases``: ``{id: decoding kwargs}``; a ``"draft"`` entry names a draft for ``make_draft``.
* ``bad_inputs``: ``{id: (pipeline kwargs, message regex)}`` calls that must raise ``ValueError``.
* ``pixel_size``: ``(height, width)`` of the decoded images.

A family with variants whose valid inputs differ (LlamaGen's class- and caption-conditioned models) declares one
subclass per variant, each with its own ``pipe`` fixture.
"""

import numpy as np
import PIL.Image
import pytest
import torch

import mmspec
from mmspec.models.families import family_for
from mmspec.pipelines import SpeculativeImagePipeline

__all__ = ["FamilyContract", "select_rows"]


def select_rows(kwargs: dict, rows) -> dict:
    """The pipeline keyword arguments of some rows of a batch (lists and tensors are indexed, the rest kept)."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            out[key] = value[rows]
        elif isinstance(value, (list, tuple)):
            out[key] = [value[r] for r in rows]
        else:
            out[key] = value
    return out


class FamilyContract:
    family_class: type = None
    guidance_scale: float = 2.5
    reference_scales: tuple = ()  # scales checked against reference_tokens; empty = (guidance_scale,)
    speculative_cases: dict = {
        "jacobi-random": dict(decoding="jacobi", init="random", window=6),
        "jacobi-vertical": dict(decoding="jacobi", init="vertical", window=9),
        "draft": dict(decoding="draft", window=4, draft="other"),
    }
    bad_inputs: dict = {}
    pixel_size: tuple = None

    # -- hooks --------------------------------------------------------------------------------------------
    def conditions(self, pipe) -> dict:
        raise NotImplementedError

    def reference_tokens(self, pipe, scale: float) -> torch.Tensor:
        raise NotImplementedError

    def make_draft(self, pipe, name: str):
        """A draft model for ``speculative_cases``: ``"self"`` is the target itself; others are the family's."""
        if name == "self":
            return pipe.model
        raise NotImplementedError(name)

    def check_speculative(self, pipe, name: str, out, ar) -> None:
        """Extra checks of one speculative case against the AR output (both greedy); none by default."""

    def after_load(self, pipe, again) -> None:
        """Called on a pipeline loaded from disk: re-apply settings a component does not save, check family state."""

    # -- parametrisation --------------------------------------------------------------------------------
    def pytest_generate_tests(self, metafunc):
        if "case" in metafunc.fixturenames:
            metafunc.parametrize("case", list(self.speculative_cases), ids=list(self.speculative_cases))
        if "bad" in metafunc.fixturenames:
            metafunc.parametrize("bad", list(self.bad_inputs), ids=list(self.bad_inputs))
        if "scale" in metafunc.fixturenames:
            scales = self.reference_scales or (self.guidance_scale,)
            metafunc.parametrize("scale", scales, ids=[f"scale{s:g}" for s in scales])

    def ar(self, pipe, **kw):
        return pipe(**self.conditions(pipe), do_sample=False, decoding="ar", guidance_scale=self.guidance_scale,
                    output_type="latent", **kw)

    # -- the contract -----------------------------------------------------------------------------------
    def test_family_is_picked(self, pipe):
        family = pipe.family
        assert type(family) is self.family_class
        assert type(family_for(pipe.model, tokenizer=pipe.tokenizer, vq=pipe.vq)) is self.family_class
        layout = family.layout()
        assert layout.num_tokens >= layout.height * layout.width

    def test_ar_equals_reference(self, pipe, scale):
        out = pipe(**self.conditions(pipe), do_sample=False, decoding="ar", guidance_scale=scale,
                   output_type="latent")
        ref = self.reference_tokens(pipe, scale)
        assert torch.equal(out.tokens, ref)
        assert len({tuple(r) for r in out.tokens.tolist()}) == len(out.tokens)  # the conditions matter
        assert out.stats.target_forwards == pipe.family.layout().num_tokens  # AR: one forward per token

    def test_greedy_speculative_equals_ar(self, pipe, case):
        kwargs = dict(self.speculative_cases[case])
        draft = kwargs.pop("draft", None)
        if draft is not None:
            kwargs["draft_model"] = self.make_draft(pipe, draft)
        ar = self.ar(pipe)
        out = pipe(**self.conditions(pipe), do_sample=False, guidance_scale=self.guidance_scale,
                   output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs)
        assert torch.equal(out.tokens, ar.tokens)
        assert out.stats.target_forwards <= ar.stats.target_forwards
        self.check_speculative(pipe, case, out, ar)

    def test_static_cache_equals_dynamic(self, pipe):
        """``cache="static"`` gives the dynamic cache's greedy tokens, or, for adapters whose model builds its own
        attention mask (no 4-D mask over a static cache), is refused with a clear error."""
        import inspect

        kw = dict(self.conditions(pipe), do_sample=False, guidance_scale=self.guidance_scale, output_type="latent",
                  decoding="jacobi", window=6, init="vertical", cache="static")
        params = inspect.signature(pipe.family.adapter.__init__).parameters
        if "cache" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            with pytest.raises(ValueError, match="not supported"):
                pipe(**kw)
            return
        out = pipe(**kw, generator=torch.Generator().manual_seed(0))
        assert torch.equal(out.tokens, self.ar(pipe).tokens)

    def test_sampling_is_reproducible_per_image(self, pipe):
        kw = dict(self.conditions(pipe), guidance_scale=self.guidance_scale, output_type="latent")
        B = len(self.ar(pipe).tokens)

        def run(seeds, **extra):
            gens = [torch.Generator().manual_seed(s) for s in seeds]
            return pipe(**kw, generator=gens, **extra).tokens

        seeds = list(range(11, 11 + B))
        jacobi = dict(decoding="jacobi", window=6, init="vertical")
        a = run(seeds, **jacobi)
        assert torch.equal(a, run(seeds, **jacobi))
        assert not torch.equal(a, run([s + B for s in seeds], **jacobi))
        # each image depends only on its own generator, not on the other rows of the batch
        batch = run(seeds, decoding="ar")
        alone = pipe(**select_rows(kw, [1]), decoding="ar", generator=[torch.Generator().manual_seed(seeds[1])])
        assert torch.equal(alone.tokens[0], batch[1])

    def test_output_types(self, pipe):
        cond = self.conditions(pipe)
        layout = pipe.family.layout()
        H, W = self.pixel_size
        out = pipe(**cond, num_images_per_prompt=2, generator=torch.Generator().manual_seed(1))  # sampled SJD
        B = len(out.images) // 2
        assert len(out.images) == 2 * B and out.lossless
        assert all(isinstance(im, PIL.Image.Image) and im.size == (W, H) for im in out.images)
        assert out.tokens.shape == (2 * B, layout.height * layout.width)
        assert out.tokens.min() >= 0 and out.tokens.max() < layout.codebook_size
        latent = pipe(**cond, num_images_per_prompt=2, generator=torch.Generator().manual_seed(1),
                      output_type="latent")
        assert torch.equal(latent.tokens, out.tokens)
        assert latent.images.shape == (2 * B, layout.height, layout.width)
        assert torch.equal(latent.images.flatten(1), latent.tokens)
        pt = pipe(**cond, do_sample=False, output_type="pt")
        assert pt.images.shape == (B, 3, H, W) and pt.images.min() >= 0 and pt.images.max() <= 1
        arr = pipe(**cond, do_sample=False, output_type="np").images
        assert isinstance(arr, np.ndarray) and arr.shape == (B, H, W, 3)
        assert np.allclose(arr, pt.images.permute(0, 2, 3, 1).numpy())
        images, tokens, stats = pipe(**cond, do_sample=False, output_type="pt", return_dict=False)
        assert torch.equal(tokens, pt.tokens) and torch.equal(images, pt.images) and stats.target_forwards > 0

    def test_relaxed_criteria_degenerate_to_exact(self, pipe):
        """LANTERN with delta 0 and GSD with groups of one accept exactly what exact acceptance accepts."""
        kw = dict(self.conditions(pipe), do_sample=True, decoding="jacobi", window=6, output_type="latent")

        def run(acceptance):
            return pipe(**kw, acceptance=acceptance, generator=torch.Generator().manual_seed(3))

        exact = run("exact")
        lantern = run(mmspec.acceptance.get("lantern", k=4, delta=0.0))
        gsd = run(mmspec.acceptance.get("gsd", group_size=1))
        assert torch.equal(exact.tokens, lantern.tokens) and torch.equal(exact.tokens, gsd.tokens)
        assert exact.lossless and not lantern.lossless and not gsd.lossless

    def test_bad_inputs(self, pipe, bad):
        kwargs, match = self.bad_inputs[bad]
        with pytest.raises(ValueError, match=match):
            pipe(**kwargs, output_type="latent")

    def test_save_and_load(self, pipe, tmp_path):
        pipe.save_pretrained(tmp_path)
        again = SpeculativeImagePipeline.from_pretrained(tmp_path)
        again.set_progress_bar_config(disable=True)
        self.after_load(pipe, again)
        assert type(again.family) is self.family_class
        kw = dict(self.conditions(pipe), do_sample=False, output_type="pt")
        a, b = pipe(**kw), again(**kw)
        assert torch.equal(a.tokens, b.tokens) and torch.allclose(a.images, b.images, atol=1e-4)
