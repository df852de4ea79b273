"""The bundled captioner (tiny LLaVA trained on the zoo scenes) and its draft: loading, lossless decoding,
and caption quality above chance on held-out scenes."""

import pytest
import torch

from mmspec.zoo.data import make_scene, scene_seed
from mmspec.zoo.recipes.captioner import PROMPT, load_caption_pipeline
from mmspec.zoo.recipes.common import HELDOUT_SCENE_SEED

pytestmark = pytest.mark.slow  # loads the bundled weights and decodes 8 scenes 5 times (~10-40 s on a busy CPU)


@pytest.fixture(scope="module")
def pipe():
    return load_caption_pipeline(with_draft=True)


@pytest.fixture(scope="module")
def scenes():
    return [make_scene(scene_seed(HELDOUT_SCENE_SEED, 90_000 + i)) for i in range(8)]


def test_loads_with_draft(pipe):
    assert pipe.draft_model is not None and pipe.prompt == PROMPT
    assert type(pipe.model).__name__ == "LlavaForConditionalGeneration"
    assert sum(p.numel() for p in pipe.draft_model.parameters()) < sum(p.numel() for p in pipe.model.parameters())


def test_speculative_captions_equal_ar(pipe, scenes):
    images = [s.image for s in scenes]
    ar = pipe(images, decoding="ar", batch_size=4)
    for decoding in ("lookup", "jacobi", "draft"):
        out = pipe(images, decoding=decoding, batch_size=4)
        assert out.captions == ar.captions, decoding
        assert all(torch.equal(a, b) for a, b in zip(out.sequences, ar.sequences))
    assert pipe(images, decoding="draft", batch_size=4).stats.step_compression > 1.0


def test_captions_describe_the_scene(pipe, scenes):
    """Word accuracy well above what a caption of another scene gets (the card reports 256 scenes)."""
    out = pipe([s.image for s in scenes], decoding="lookup", batch_size=8)

    def accuracy(pairs):
        ok = total = 0
        for ref, hyp in pairs:
            ref, hyp = ref.split(), hyp.split()
            ok += sum(a == b for a, b in zip(ref, hyp))
            total += len(ref)
        return ok / total

    own = accuracy(zip([s.caption for s in scenes], out.captions))
    shuffled = accuracy(zip([s.caption for s in scenes], out.captions[1:] + out.captions[:1]))
    assert own > shuffled + 0.05, (own, shuffled)
