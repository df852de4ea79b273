"""SpeculativeContinuousPipeline on tiny random components, and the bundled continuous zoo models."""

from __future__ import annotations

import json

import pytest
import torch

from mmspec.models.mar import ContinuousARModel
from mmspec.pipelines.continuous import SpeculativeContinuousPipeline
from mmspec.zoo.hub import WEIGHTS_DIR


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=2, norm_num_groups=4, sample_size=8, mid_block_add_attention=False).eval()


def tiny_pipe():
    torch.manual_seed(1)
    model = ContinuousARModel(token_dim=2, grid_size=4, num_classes=3, hidden_size=16, num_layers=1, num_heads=2,
                              head_width=16, head_depth=1).eval()
    draft = ContinuousARModel(token_dim=2, grid_size=4, num_classes=3, hidden_size=8, num_layers=1, num_heads=1,
                              head_width=8, head_depth=1).eval()
    pipe = SpeculativeContinuousPipeline(model=model, vae=tiny_vae(), class_names=["red", "green", "blue"])
    pipe.set_progress_bar_config(disable=True)
    return pipe, draft


def test_pipeline_outputs_and_stats():
    pipe, draft = tiny_pipe()
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    out = pipe(["a red thing", "blue"], num_images_per_prompt=2, generator=gens, draft_model=draft, window=3,
               num_inference_steps=3, output_type="pt")
    assert out.images.shape == (4, 3, 8, 8) and 0 <= float(out.images.min()) and float(out.images.max()) <= 1
    assert out.tokens.shape == (4, 16, 2) and out.lossless
    assert out.stats.new_tokens == 64 and out.acceptance_rate is not None
    steps = []
    ar = pipe(class_labels=[0, 2], decoding="ar", num_inference_steps=3, output_type="latent",
              callback_on_step_end=lambda p, step, n, kw: steps.append(n))
    assert ar.images.shape == (2, 2, 4, 4) and ar.stats.step_compression == 1.0 and ar.acceptance_rate is None
    assert steps == list(range(1, 17))
    pil = pipe(class_labels=1, decoding="ar", num_inference_steps=2).images
    assert len(pil) == 1 and pil[0].size == (8, 8)
    np_images = pipe(class_labels=1, decoding="ar", num_inference_steps=2, output_type="np").images
    assert np_images.shape == (1, 8, 8, 3)


def test_pipeline_is_reproducible_per_generator():
    pipe, draft = tiny_pipe()
    a = pipe(class_labels=[0, 1], generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)],
             draft_model=draft, num_inference_steps=3, output_type="latent").tokens
    b = pipe(class_labels=[0, 1], generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)],
             draft_model=draft, num_inference_steps=3, output_type="latent").tokens
    torch.testing.assert_close(a, b)


def test_pipeline_rejects_bad_arguments():
    pipe, draft = tiny_pipe()
    with pytest.raises(ValueError, match="draft_model"):
        pipe(class_labels=0)
    with pytest.raises(ValueError, match="decoding"):
        pipe(class_labels=0, decoding="jacobi")
    with pytest.raises(ValueError, match="exactly one"):
        pipe(decoding="ar")
    with pytest.raises(ValueError, match="names none"):
        pipe("purple", decoding="ar")
    with pytest.raises(ValueError, match="class_labels"):
        pipe(class_labels=7, decoding="ar")
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=0, decoding="ar", output_type="jpg")
    with pytest.raises(ValueError, match="generators"):
        pipe(class_labels=[0, 1], decoding="ar", generator=[torch.Generator()])
    with pytest.raises(ValueError, match="continuous"):
        pipe(class_labels=0, draft_model=draft, acceptance="lantern")


def test_pipeline_save_and_load(tmp_path):
    pipe, _ = tiny_pipe()
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["model"] == ["mmspec.models.mar", "ContinuousARModel"]
    loaded = SpeculativeContinuousPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.class_names == ["red", "green", "blue"]
    kw = dict(class_labels=[2], decoding="ar", num_inference_steps=3, output_type="latent")
    torch.testing.assert_close(pipe(generator=torch.Generator().manual_seed(0), **kw).tokens,
                               loaded(generator=torch.Generator().manual_seed(0), **kw).tokens)


@pytest.mark.skipif(not (WEIGHTS_DIR / "mar_draft" / "config.json").is_file(), reason="bundled weights not built")
def test_bundled_continuous_models():
    sizes = {n: sum(p.stat().st_size for p in (WEIGHTS_DIR / n).glob("*.safetensors"))
             for n in ("mar_vae", "mar_target", "mar_draft")}
    assert sum(sizes.values()) < 6e6, sizes
    pipe, draft = SpeculativeContinuousPipeline.from_zoo()
    pipe.set_progress_bar_config(disable=True)
    assert draft.num_tokens == pipe.model.num_tokens == 64
    out = pipe("red", generator=torch.Generator().manual_seed(0), draft_model=draft, window=3,
               num_inference_steps=6, output_type="pt")
    assert out.images.shape == (1, 3, 32, 32) and out.stats.new_tokens == 64


def test_sample_script_writes_images_and_stats(tmp_path):
    import importlib.util
    from pathlib import Path

    pipe, draft = tiny_pipe()
    pipe.save_pretrained(tmp_path / "pipe")
    draft.save_pretrained(tmp_path / "draft")
    path = Path(__file__).resolve().parents[1] / "samples" / "generate_continuous.py"
    spec = importlib.util.spec_from_file_location("generate_continuous", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--model", str(tmp_path / "pipe"), "--draft", str(tmp_path / "draft"), "--prompt", "green",
                       "--num-images", "2", "--steps", "2", "--window", "3", "--out", str(tmp_path / "out")])
    assert out.images.shape[0] == 2
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["new_tokens"] == 32 and stats["lossless"] is True
    assert (tmp_path / "out" / "grid.png").is_file() and (tmp_path / "out" / "image_001.png").is_file()
