"""Tests for the bundled zoo models (mmspec.zoo.hub) and their recipes (mmspec.zoo.train).

The bars below come from the bundled models' own held-out measurements (see
mmspec/zoo/weights/*/metrics.json and mmspec/zoo/cards/), lowered by a margin that covers the
smaller test sets used here.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json

import numpy as np
import pytest
import torch

from mmspec.zoo import hub
from mmspec.zoo.data import LABEL_NAMES, POSITIONS
from mmspec.zoo.recipes.classifier import ACCURACY_BARS, EVAL_DEFAULT_SEED, EVAL_ONE_OBJECT_SEED
from mmspec.zoo.recipes.common import (
    HELDOUT_CROP_SEED,
    HELDOUT_SCENE_SEED,
    crop_batch,
    label_tensors,
    psnr,
    scene_batch,
)

# Bundled tokenizer, mean PSNR on 256 held-out images (metrics.json): scenes 26.1 dB, crops 25.8 dB;
# on the 16-image subsets used here 25.5 and 25.1 dB; the bars leave ~1.5 dB of margin (the first
# tokenizer, vq_v1, measured 23.6 dB on the scene subset and fails the scene bar).
PSNR_BAR_SCENES = 24.0
PSNR_BAR_CROPS = 23.5
# Unigram code entropy on held-out images: 6.58 nats over 512 images, 5.9-6.2 on the 16-image subsets.
CODE_ENTROPY_BAR_NATS = 5.5
# The evaluation classifier on reconstructions of 64 held-out two-object scenes (read at the caption's cell):
# measured shape 0.906, colour 0.984, position 1.0, size 0.891, background 0.875, background colour 1.0
# (vq_v1: shape 0.70, colour 0.66, size 0.73, so it fails); bars ~0.07-0.09 below, 0.05 on the easy heads.
RECON_ACCURACY_BARS = {"shape": 0.82, "colour": 0.93, "position": 0.95, "size": 0.80, "background": 0.78,
                       "background_colour": 0.95}
# Classifier: the recipe's stated bars (ACCURACY_BARS: shape >= 0.90, colour >= 0.95, ...), here on
# 200 held-out scenes (120 one-object, 80 two-object); measured 0.99-1.00 on every head over 500
# and 0.988-1.0 on these subsets.


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # these small convolutions run fastest on one thread, and far faster than on two when other
    # jobs share the cores (OpenMP workers wait for each other)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def vq():
    return hub.load_vq()


@pytest.fixture(scope="module")
def clf():
    return hub.load_classifier()


@pytest.fixture(scope="module")
def heldout_scenes():
    return scene_batch(0, 16, HELDOUT_SCENE_SEED, 2)[0]


@pytest.fixture(scope="module")
def heldout_crops():
    return crop_batch(0, 16, HELDOUT_CROP_SEED)


@pytest.fixture(scope="module")
def round_trips(vq, heldout_scenes, heldout_crops):
    """(images, tokens, reconstructions) of the held-out scenes and crops."""
    out = {}
    for name, x in (("scenes", heldout_scenes), ("crops", heldout_crops)):
        t = hub.encode_images(vq, x)
        out[name] = (x, t, hub.decode_tokens(vq, t))
    return out


# ---------------------------------------------------------------------------------- tokenizer


def test_vq_loads_from_package_in_fp16_files():
    path = hub.weights_path("vq")
    assert path.parent == hub.WEIGHTS_DIR and (path / "diffusion_pytorch_model.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(path / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert sum(p.stat().st_size for p in path.iterdir()) < 5 * 2**20


def test_vq_shapes_and_ranges(vq, round_trips):
    _, tokens, y = round_trips["scenes"]
    assert vq.config.num_vq_embeddings == 1024
    assert next(vq.parameters()).dtype == torch.float32
    assert tokens.shape == (16, 256) and tokens.dtype == torch.long
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 1024
    assert y.shape == (16, 3, 64, 64) and y.dtype == torch.float32
    assert float(y.min()) >= -1.0 and float(y.max()) <= 1.0
    cb = hub.codebook(vq)
    assert cb.shape == (1024, vq.config.vq_embed_dim)
    assert torch.equal(cb, vq.quantize.embedding.weight.detach())


def test_vq_tokens_are_row_major_nearest_codes(vq, round_trips):
    x, tokens, _ = round_trips["scenes"]
    with torch.no_grad():
        z = vq.encode(x).latents  # [B, D, 16, 16]
    cb = hub.codebook(vq)
    for r, c in [(0, 0), (0, 15), (3, 7), (15, 0), (15, 15)]:
        nearest = torch.cdist(z[:, :, r, c], cb).argmin(-1)
        assert torch.equal(tokens[:, r * 16 + c], nearest)


def test_vq_decode_tokens_matches_diffusers_forward(vq, round_trips):
    x, _, ours = round_trips["scenes"]
    with torch.no_grad():
        ref = vq(x).sample.clamp(-1, 1)  # encode -> quantize -> decode inside diffusers
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_vq_round_trip_error_is_bounded(round_trips):
    for name, bar in (("scenes", PSNR_BAR_SCENES), ("crops", PSNR_BAR_CROPS)):
        x, _, y = round_trips[name]
        assert float(psnr(y, x).mean()) >= bar, name
    # the bar discriminates: the same reconstructions scored against other images fall far below it
    x, _, y = round_trips["scenes"]
    assert float(psnr(y, x.roll(1, 0)).mean()) < PSNR_BAR_SCENES - 5


def test_classifier_reads_prompted_attributes_on_vq_reconstructions(vq, clf):
    x, scenes = scene_batch(0, 64, HELDOUT_SCENE_SEED + 1, 2)
    lab = label_tensors(scenes)
    y = hub.decode_tokens(vq, hub.encode_images(vq, x))
    pred = hub.classify(clf, y, positions=lab["position"])
    acc = {k: float((pred[k] == lab[k]).float().mean()) for k in RECON_ACCURACY_BARS}
    for k, bar in RECON_ACCURACY_BARS.items():
        assert acc[k] >= bar, (k, acc)
    # the bars discriminate: a decoder that keeps only the background (each image's mean colour) fails them
    flat = x.mean((2, 3), keepdim=True).expand_as(x)
    pred = hub.classify(clf, flat, positions=lab["position"])
    assert float((pred["shape"] == lab["shape"]).float().mean()) < RECON_ACCURACY_BARS["shape"]


def test_vq_code_usage_and_entropy(round_trips):
    tokens = torch.cat([round_trips["scenes"][1], round_trips["crops"][1]])  # 8192 codes
    st = hub.code_statistics(tokens, 1024)
    assert st["entropy_nats"] >= CODE_ENTROPY_BAR_NATS
    assert st["used"] >= 500  # spread over at least half the codebook


def test_vq_input_validation(vq):
    with pytest.raises(ValueError, match="images"):
        hub.encode_images(vq, torch.zeros(2, 64, 64))
    with pytest.raises(ValueError, match="floating"):
        hub.encode_images(vq, torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="square"):
        hub.decode_tokens(vq, torch.zeros(1, 255, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 1024\)"):
        hub.decode_tokens(vq, torch.full((1, 256), 1024))
    assert hub.decode_tokens(vq, torch.zeros(1, 32, dtype=torch.long), grid=(4, 8)).shape == (1, 3, 16, 32)
    with pytest.raises(FileNotFoundError, match="keyword"):
        hub.load_vq("cpu")
    with pytest.raises(ValueError, match="unknown bundled model"):
        hub.weights_path("vae")


def test_code_statistics():
    st = hub.code_statistics(torch.arange(8).repeat(5), 16)
    assert st["used"] == 8 and st["usage"] == 0.5
    assert st["entropy_nats"] == pytest.approx(np.log(8)) and st["perplexity"] == pytest.approx(8)


# ---------------------------------------------------------------------------------- classifier


def test_classifier_loads_and_shapes(clf, heldout_scenes):
    assert (hub.weights_path("classifier") / "config.json").is_file()
    x = heldout_scenes[:5]
    pred = hub.classify(clf, x)
    assert set(pred) == set(LABEL_NAMES)
    for k, v in pred.items():
        assert v.shape == (5,) and v.dtype == torch.long
        assert 0 <= int(v.min()) and int(v.max()) < len(LABEL_NAMES[k])
    f = hub.features(clf, x)
    assert f.shape == (5, clf.config.cell_dim + clf.config.global_dim) and f.dtype == torch.float32
    g = hub.classify_grid(clf, x)
    assert g["grid_shape"].shape == (5, len(POSITIONS)) and g["occupied"].shape == (5, len(POSITIONS))
    with pytest.raises(ValueError, match="positions"):
        hub.classify(clf, x, positions=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="positions"):
        hub.classify(clf, x, positions=torch.full((5,), 9))


def _accuracy(pred, labels):
    return {k: float((pred[k] == labels[k]).float().mean()) for k in pred}


def test_classifier_accuracy_on_heldout_scenes(clf):
    x, scenes = scene_batch(0, 120, EVAL_ONE_OBJECT_SEED, 1)
    acc = _accuracy(hub.classify(clf, x), label_tensors(scenes))
    for k, bar in ACCURACY_BARS.items():
        assert acc[k] >= bar, (k, acc)
    # two-object scenes as SceneDataset makes them, read at the caption's position (prompt adherence)
    x, scenes = scene_batch(0, 80, EVAL_DEFAULT_SEED, 2)
    lab = label_tensors(scenes)
    acc = _accuracy(hub.classify(clf, x, positions=lab["position"]), lab)
    for k in ("shape", "colour", "size", "position", "background", "background_colour"):
        assert acc[k] >= ACCURACY_BARS[k], (k, acc)
    # a shuffled caption must not score: adherence drops to chance level
    wrong = _accuracy(hub.classify(clf, x, positions=lab["position"]), {k: v.roll(1) for k, v in lab.items()})
    assert wrong["shape"] < 0.5


# ---------------------------------------------------------------------------------- frechet


def test_frechet_distance_properties():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 16)) @ rng.standard_normal((16, 16))
    assert hub.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    d = [hub.frechet_distance(a, a + s * rng.standard_normal(a.shape) + s) for s in (0.1, 0.5, 1.0, 2.0)]
    assert all(x < y for x, y in zip(d, d[1:])) and d[0] > 0
    # agrees with the textbook formula via scipy's general matrix square root
    from scipy import linalg

    b = rng.standard_normal((300, 16)) * 2 + 1
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((mu_a - mu_b) ** 2).sum() + np.trace(sa + sb - 2 * linalg.sqrtm(sa @ sb).real)
    assert hub.frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(ref, rel=1e-6)
    # rank-deficient covariances (fewer samples than dimensions) stay finite and non-negative
    assert np.isfinite(hub.frechet_distance(a[:8], b[:8])) and hub.frechet_distance(a[:8], b[:8]) >= 0
    with pytest.raises(ValueError):
        hub.frechet_distance(a, b[:, :8])


def test_frechet_in_classifier_space(clf):
    x = scene_batch(0, 200, HELDOUT_SCENE_SEED + 5, 2)[0]
    real_a, real_b = hub.features(clf, x[:100]), hub.features(clf, x[100:])
    assert hub.frechet_distance(real_a, real_a) == pytest.approx(0.0, abs=1e-4)
    # grows with the strength of an image-space perturbation (pixel noise)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x[:100].shape, generator=g)
    d = [hub.frechet_distance(real_a, hub.features(clf, (x[:100] + s * noise).clamp(-1, 1))) for s in (0.05, 0.2, 0.5)]
    assert 0 < d[0] < d[1] < d[2]
    # another real sample is closer than another domain
    crops = hub.features(clf, crop_batch(0, 100, HELDOUT_CROP_SEED))
    assert hub.frechet_distance(real_a, real_b) < 0.5 * hub.frechet_distance(real_a, crops)


# ---------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("model", ["vq", "classifier"])
def test_recipe_tiny_run_end_to_end(model, tmp_path):
    from mmspec.zoo.train import main

    out = tmp_path / model
    metrics = main([model, "--minutes", "0.05", "--max-steps", "2", "--eval-n", "4", "--threads", "1", "--out", str(out)])
    assert metrics["steps"] >= 1
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["model"] == model and saved["steps"] == metrics["steps"]
    if model == "vq":
        m = hub.load_vq(out)
        assert hub.encode_images(m, torch.zeros(1, 3, 64, 64)).shape == (1, 256)
        assert 0.0 < saved["heldout"]["all"]["code_usage"] <= 1.0
    else:
        m = hub.load_classifier(out)
        assert set(hub.classify(m, torch.zeros(2, 3, 64, 64))) == set(LABEL_NAMES)
        assert "accuracy" in saved["heldout"]["one_object"]


# -------------------------------------------------------------- the 4,096-code tokenizer (vq4096)

#: issue 15's bar, >= 0.95 on every head (measured 0.973-1.0 on 256 scenes, metrics.json; on these 64 scenes 0.984
#: at the least, and the shipped 1,024-code tokenizer 0.922 on shape and background)
VQ4096_RECON_BAR = 0.95


def test_vq4096_keeps_what_the_prompts_name(clf):
    """The GPU-trained tokenizer: 4,096 codes, fp16 files in the package, 16x16 codes per 64x64 image, and the
    classifier reads every head on its reconstructions of held-out two-object scenes (at the first object's cell)
    at issue 15's bar, which the shipped 1,024-code tokenizer misses on shape and background."""
    path = hub.weights_path("vq4096")
    assert sum(p.stat().st_size for p in path.iterdir()) < 5 * 2**20
    vq4096 = hub.load_vq(path)
    assert hub.codebook(vq4096).shape[0] == 4096
    x, scenes = scene_batch(0, 64, HELDOUT_SCENE_SEED + 1, 2)
    lab = label_tensors(scenes)
    tokens = hub.encode_images(vq4096, x)
    assert tokens.shape == (64, 256) and int(tokens.max()) < 4096
    assert hub.code_statistics(tokens, 4096)["used"] >= 2048  # the codebook is in use, not a few codes
    pred = hub.classify(clf, hub.decode_tokens(vq4096, tokens), positions=lab["position"])
    acc = {k: float((pred[k] == lab[k]).float().mean()) for k in LABEL_NAMES}
    assert min(acc.values()) >= VQ4096_RECON_BAR, acc
    metrics = json.loads((path / "metrics.json").read_text())
    heads = metrics["heldout"]["classifier_on_reconstructions"]
    assert min(heads[k][h] for k in ("one_object_reconstruction", "two_object_reconstruction") for h in LABEL_NAMES) >= 0.95


def test_token_models_name_their_tokenizer():
    """A token model's config names the tokenizer whose codes it generates (``hub.tag_vq``); ``hub.load_vq_for``
    loads that one, falls back to the first tokenizer for configs that name none, and refuses a tokenizer whose
    codebook is not the one the model learnt (its images would decode to noise)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1)
    assert hub.codebook(hub.load_vq_for(cfg)).shape[0] == 1024  # names none: the default tokenizer
    vq4096 = hub.load_vq(hub.weights_path("vq4096"))
    hub.tag_vq(cfg, vq4096, hub.weights_path("vq4096"))
    assert cfg.zoo_vq == {"name": "vq4096", "codebook": hub.codebook_id(vq4096)}
    again = LlamaConfig.from_dict(cfg.to_dict())  # survives save/load of the config
    assert hub.codebook_id(hub.load_vq_for(again)) == hub.codebook_id(vq4096)
    cfg.zoo_vq = {"name": "vq", "codebook": hub.codebook_id(vq4096)}  # the 1,024-code tokenizer under that tag
    with pytest.raises(ValueError, match="trained on the codes of tokenizer 'vq'"):
        hub.load_vq_for(cfg)
    cfg.zoo_vq = {"name": "nonexistent"}
    with pytest.raises(ValueError, match="unknown bundled model"):
        hub.load_vq_for(cfg)



def test_diffusers_token_models_name_their_tokenizer_in_a_file(tmp_path):
    """A LlamaGen model's frozen diffusers config takes no new keys: ``hub.tag_vq_folder`` writes the tag to
    ``zoo_vq.json`` beside the weights and ``hub.load_vq_for(folder)`` reads it (no file: the default tokenizer);
    the c2i pipeline decodes with the tokenizer its folder names."""
    assert hub.vq_tag(tmp_path) == {"name": hub.DEFAULT_VQ}
    vq4096 = hub.load_vq(hub.weights_path("vq4096"))
    hub.tag_vq_folder(tmp_path, vq4096, "vq4096")
    assert hub.vq_tag(tmp_path) == {"name": "vq4096", "codebook": hub.codebook_id(vq4096)}
    assert hub.codebook_id(hub.load_vq_for(tmp_path)) == hub.codebook_id(vq4096)
    (tmp_path / hub.VQ_TAG_FILE).write_text(json.dumps({"name": "vq", "codebook": hub.codebook_id(vq4096)}))
    with pytest.raises(ValueError, match="trained on the codes"):
        hub.load_vq_for(str(tmp_path))
    from mmspec.zoo.models import load_c2i_pipeline

    pipe = load_c2i_pipeline()
    assert hub.codebook(pipe.vq).shape[0] == pipe.model.vocab_size


def test_the_bundled_zoo_fits_in_60_MB():
    """The zoo ships inside the package: every bundled model together stays under 60 MB (decimal)."""
    total = sum(f.stat().st_size for f in hub.WEIGHTS_DIR.rglob("*") if f.is_file())
    assert 10e6 < total < 60e6, f"the bundled weights take {total / 1e6:.1f} MB"
