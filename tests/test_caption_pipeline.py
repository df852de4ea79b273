"""CaptionPipeline: input kinds, batching independence, equality with the model's own greedy generate,
drafts, save/load, and clear errors."""

import io

import numpy as np
import PIL.Image
import pytest
import torch

import mmspec
from mmspec.pipelines import CaptionOutput, CaptionPipeline
from mmspec.pipelines.caption import load_image

from lm_fixtures import tiny_causal_lm
from vlm_fixtures import random_images, tiny_llava, tiny_qwen2_vl

NEW = 10


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(seed=0)


@pytest.fixture(scope="module")
def pipe(llava):
    model, processor = llava
    return CaptionPipeline(model, processor, decoding="lookup")


def test_input_kinds_give_the_same_caption(pipe, tmp_path):
    image = random_images(1, seed=5)[0]  # uint8 HWC
    path = tmp_path / "scene.png"
    PIL.Image.fromarray(image).save(path)
    kinds = [image, PIL.Image.fromarray(image), torch.from_numpy(image).permute(2, 0, 1).double() / 255.0,
             str(path), path, path.read_bytes(), image.astype(np.float32) / 255.0]
    out = pipe(kinds, max_new_tokens=NEW, batch_size=3)
    assert isinstance(out, CaptionOutput) and len(out.captions) == len(kinds) == len(out.sequences)
    assert all(torch.equal(s, out.sequences[0]) for s in out.sequences)
    assert len(set(out.captions)) == 1 and out.captions[0]


def test_equals_model_generate_and_batch_independence(pipe, llava):
    model, processor = llava
    images = random_images(5, seed=1, sizes=((32, 32), (40, 24), (24, 48)))
    batched = pipe(images, max_new_tokens=NEW, batch_size=3, progress=False)
    for decoding in ("ar", "jacobi"):
        assert pipe(images, max_new_tokens=NEW, batch_size=2, decoding=decoding).captions == batched.captions
    for image, seq in zip(images, batched.sequences):
        inputs = pipe.prepare_inputs([load_image(image)], pipe.prompt)
        ref = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
        T = inputs["input_ids"].shape[1]
        expected = ref[0, T:]
        expected = expected[expected != model.generation_config.pad_token_id] if seq.numel() < NEW else expected
        assert torch.equal(seq, expected)
    stats = batched.stats
    assert stats.new_tokens == sum(len(s) for s in batched.sequences) == sum(stats.new_tokens_per_row)
    assert len(stats.row_forwards) == 5 and stats.target_forwards > 0


def test_draft_decoding_text_and_vlm_drafts(llava):
    model, processor = llava
    images = random_images(4, seed=2)
    ref = CaptionPipeline(model, processor, decoding="ar")(images, max_new_tokens=NEW)
    text_draft = tiny_causal_lm("llama", vocab_size=mmspec.models.vocab_size_of(model), seed=4, sharpen=4.0)
    vlm_draft, _ = tiny_llava(seed=1)
    for draft in (text_draft, vlm_draft):
        out = CaptionPipeline(model, processor, draft_model=draft, decoding="draft", window=3)(images, max_new_tokens=NEW)
        assert out.captions == ref.captions
        assert out.stats.draft_forwards > 0


def test_chat_template_prompt_qwen2_vl():
    model, processor = tiny_qwen2_vl(seed=0)
    pipe = CaptionPipeline(model, processor, prompt="describe the image")
    text = pipe.format_prompt("describe the image")
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text and text.endswith("assistant\n")
    images = random_images(3, seed=3, sizes=((32, 32), (16, 32), (32, 24)))
    out = pipe(images, max_new_tokens=NEW, batch_size=3)
    singles = [pipe(im, max_new_tokens=NEW, decoding="ar").captions[0] for im in images]
    assert out.captions == singles


def test_save_and_load_roundtrip(pipe, tmp_path):
    images = random_images(2, seed=7)
    pipe.save_pretrained(tmp_path / "p")
    loaded = CaptionPipeline.from_pretrained(tmp_path / "p", dtype=torch.float64)
    assert loaded.decoding == pipe.decoding and loaded.prompt == pipe.prompt
    assert loaded(images, max_new_tokens=NEW).captions == pipe(images, max_new_tokens=NEW).captions


@pytest.mark.parametrize("bad, error", [
    (np.zeros((8, 8, 3), dtype=np.int64), ValueError),
    (np.full((8, 8, 3), 2.0), ValueError),
    (torch.rand(5, 8, 8), ValueError),
    (b"not an image", ValueError),
    ("/no/such/file.png", ValueError),
    (3.5, TypeError),
    ([], ValueError),
])
def test_invalid_images_raise_clear_errors(pipe, bad, error):
    with pytest.raises(error):
        pipe(bad, max_new_tokens=2)


def test_invalid_arguments(pipe, llava):
    image = random_images(1)[0]
    with pytest.raises(ValueError, match="decoding"):
        pipe(image, decoding="beam")
    with pytest.raises(ValueError, match="draft_model"):
        pipe(image, decoding="draft")
    with pytest.raises(ValueError, match="batch_size"):
        pipe(image, batch_size=0)
    with pytest.raises(TypeError, match="prompt"):
        pipe(image, prompt=3)
    with pytest.raises(TypeError):
        CaptionPipeline(object(), llava[1])


def test_bytes_of_a_jpeg(pipe):
    buf = io.BytesIO()
    PIL.Image.fromarray(random_images(1, seed=9)[0]).save(buf, format="JPEG")
    out = pipe(buf.getvalue(), max_new_tokens=4)
    assert len(out.captions) == 1
