"""Janus / Janus-Pro (transformers JanusForConditionalGeneration) image generation through mmspec.

The family contract (tests/family_contract.py) runs with transformers' own
``JanusForConditionalGeneration.generate(generation_mode="image", do_sample=False)`` (greedy is supported there)
as the AR reference, with guidance on and a left-padded batch of different prompts.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

import mmspec.models.janus  # noqa: F401  (registers the family)
from mmspec.models.families import family_for
from mmspec.models.janus import JanusFamily, JanusLM
from mmspec.pipelines import SpeculativeImagePipeline

from family_contract import FamilyContract

WORDS = ["<pad>", "<bos>", "<eos>", "<image_placeholder>", "<begin_of_image>", "<end_of_image>", "<unk>",
         "a", "red", "blue", "green", "circle", "square", "on", "background"]
PAD, BOS, BOI = 0, 1, 4
GRID, CODES = 4, 16
SAME_LENGTH = ["a red circle", "a blue square", "green on red"]
RAGGED = ["a red circle", "a blue square on green background", "green"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>",
                              "eoi_token": "<end_of_image>"})


def tiny_janus(seed=0, hidden=32, layers=2, dtype=torch.float64, sharpen=4.0):
    """A random JanusForConditionalGeneration: 4x4 code grid, 16 codes, VQ decoding to 8x8 pixels."""
    from transformers import (
        JanusConfig,
        JanusForConditionalGeneration,
        JanusVisionConfig,
        JanusVQVAEConfig,
        LlamaConfig,
    )

    torch.manual_seed(seed)
    text = LlamaConfig(vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=128, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2)
    vision = JanusVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                               patch_size=4, projection_dim=hidden, num_image_tokens=GRID * GRID, mlp_ratio=2.0)
    vq = JanusVQVAEConfig(embed_dim=4, num_embeddings=CODES, latent_channels=8, base_channels=32,
                          channel_multiplier=[1, 1], num_res_blocks=1, projection_dim=hidden,
                          image_token_embed_dim=hidden, num_hidden_layers=2)
    model = JanusForConditionalGeneration(JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                                                      image_token_id=3))
    with torch.no_grad():  # random init (std 0.02) gives near-constant grids: spread codes, peak the logits
        model.model.generation_embeddings.weight.normal_()
        for p in model.model.generation_aligner.parameters():
            p.mul_(10)
        model.model.generation_head.proj_out.weight.mul_(10)
        model.model.generation_head.vision_head.weight.mul_(sharpen)
        for name, p in model.model.language_model.named_parameters():
            if "proj" in name:
                p.mul_(5)
    model.generation_config.pad_token_id, model.generation_config.bos_token_id = PAD, BOS
    model.generation_config.generation_kwargs = {"boi_token_id": BOI}
    model = model.to(dtype).eval()
    model.model.vqmodel.float()  # pixels need no exactness; float64 convolutions are slow on the CPU
    return model


def perturbed_copy(model, noise, seed=1):
    import copy

    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.model.language_model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * noise * p.std())
    return draft


def make_pipe(model=None, tokenizer=None):
    model = model if model is not None else tiny_janus()
    pipe = SpeculativeImagePipeline(model=model, vq=model.model.vqmodel,
                                    tokenizer=tokenizer if tokenizer is not None else tiny_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


@pytest.fixture(scope="module")
def ar_ragged(pipe):
    return pipe(RAGGED, do_sample=False, decoding="ar", guidance_scale=2.5, output_type="latent")


def hf_generate(model, input_ids, attention_mask, scale):
    return model.generate(input_ids, attention_mask=attention_mask, generation_mode="image", do_sample=False,
                          guidance_scale=scale)


def test_family_is_picked_and_uncond_rows_follow_janus(pipe):
    fam = pipe.family
    assert isinstance(fam, JanusFamily)
    layout = fam.layout()
    assert (layout.height, layout.width, layout.image_token_offset, layout.codebook_size) == (GRID, GRID, 0, CODES)
    assert layout.eol_token_id is None and layout.eoi_token_id is None and layout.num_tokens == GRID * GRID
    inputs = fam.prefill_inputs(RAGGED)
    tok = tiny_tokenizer()
    for b, p in enumerate(RAGGED):
        row = inputs["input_ids"][b][inputs["attention_mask"][b].bool()].tolist()
        assert row == tok(p)["input_ids"] + [BOI]
        un = inputs["uncond_input_ids"][b][inputs["uncond_attention_mask"][b].bool()].tolist()
        assert un == [BOS] + [PAD] * (len(row) - 2) + [BOI]
    assert torch.equal(inputs["attention_mask"], inputs["uncond_attention_mask"])


class TestJanus(FamilyContract):
    family_class = JanusFamily
    pixel_size = (8, 8)
    speculative_cases = {
        "jacobi-random": dict(decoding="jacobi", init="random", window=6),
        "jacobi-vertical": dict(decoding="jacobi", init="vertical", window=9),
        "draft-other": dict(decoding="draft", window=4, draft="other"),
        "draft-perturbed": dict(decoding="draft", window=6, draft="perturbed"),  # ragged acceptance in the batch
        "draft-self": dict(decoding="draft", window=6, draft="self"),
    }
    bad_inputs = {
        "class-labels": (dict(prompt="a red circle", class_labels=[3]), "text-conditioned"),
        "prompt-embeds": (dict(prompt="a red circle", prompt_embeds=torch.zeros(1, 2, 8)), "text-conditioned"),
        "no-prompt": (dict(prompt=None), "pass `prompt`"),
        "labels-only": (dict(prompt=None, class_labels=[1]), "text-conditioned"),
    }

    def conditions(self, pipe):
        return dict(prompt=RAGGED)

    def reference_tokens(self, pipe, scale):
        """Janus' generate on the same left-padded batch. (It passes no position ids, so its padded rows are
        shifted; rotary attention only sees relative positions, so that changes nothing beyond rounding.)"""
        inputs = pipe.family.prefill_inputs(RAGGED)
        assert not bool(inputs["attention_mask"].all())
        return hf_generate(pipe.model, inputs["input_ids"], inputs["attention_mask"], scale)

    def make_draft(self, pipe, name):
        if name == "other":
            return tiny_janus(seed=5, hidden=16, layers=1)
        if name == "perturbed":  # a draft that agrees in part
            return perturbed_copy(pipe.model, noise=0.1)
        return super().make_draft(pipe, name)

    def check_speculative(self, pipe, name, out, ar):
        if name == "draft-perturbed":
            assert out.stats.target_forwards < ar.stats.target_forwards and sum(out.stats.accepted_histogram[1:]) > 0
        if name == "draft-self":
            assert out.stats.target_forwards < ar.stats.target_forwards / 2


def test_ar_equals_transformers_generate(pipe):
    """Equal-length prompts (no padding): mmspec AR == Janus' own greedy image generation, guidance on."""
    scale = 3.0
    out = pipe(SAME_LENGTH, do_sample=False, decoding="ar", guidance_scale=scale, output_type="latent")
    inputs = pipe.family.prefill_inputs(SAME_LENGTH)
    assert bool(inputs["attention_mask"].all())
    ref = hf_generate(pipe.model, inputs["input_ids"], inputs["attention_mask"], scale)
    assert torch.equal(out.tokens, ref)
    assert len({tuple(r) for r in ref.tolist()}) == len(SAME_LENGTH)  # prompts give different images


def test_ragged_rows_equal_each_prompt_alone(pipe, ar_ragged):
    """Left-padded batch of different lengths (the batch itself is the contract's reference): every row equals
    Janus' generate on that prompt alone."""
    scale, out = 2.5, ar_ragged
    inputs = pipe.family.prefill_inputs(RAGGED)
    assert not bool(inputs["attention_mask"].all())
    assert torch.equal(out.tokens, hf_generate(pipe.model, inputs["input_ids"], inputs["attention_mask"], scale))
    for b, p in enumerate(RAGGED):
        alone = pipe.family.prefill_inputs([p])
        ref = hf_generate(pipe.model, alone["input_ids"], alone["attention_mask"], scale)
        assert torch.equal(out.tokens[b : b + 1], ref), p


def test_images_decode_through_janus_vq(pipe, ar_ragged):
    """Pixels are Janus' own ``decode_image_tokens`` of the codes (shapes and ranges are in the contract)."""
    pt = pipe(RAGGED, do_sample=False, guidance_scale=2.5, window=16, output_type="pt")
    assert torch.equal(pt.tokens, ar_ragged.tokens)
    assert pt.images.shape == (3, 3, 8, 8) and pt.images.min() >= 0 and pt.images.max() <= 1
    with torch.no_grad():
        janus = pipe.model.decode_image_tokens(pt.tokens)  # [B, H, W, 3] in [-1, 1]
    expected = ((janus.clamp(-1, 1) + 1) / 2).permute(0, 3, 1, 2).float()
    assert torch.allclose(pt.images, expected, atol=1e-6)
    codebook = pipe.family.codebook()
    assert codebook.shape == (CODES, 4) and torch.allclose(codebook.norm(dim=-1), torch.ones(CODES))


def test_processor_component_and_tokenizer_free_path():
    from transformers import JanusImageProcessor, JanusProcessor

    model = tiny_janus(hidden=16, layers=1)
    processor = JanusProcessor(image_processor=JanusImageProcessor(), tokenizer=tiny_tokenizer(),
                               num_image_tokens=GRID * GRID)
    fam = family_for(model, tokenizer=processor, vq=model.model.vqmodel)
    ours = fam.prefill_inputs(RAGGED)
    theirs = processor(text=RAGGED, generation_mode="image", padding=True)
    assert torch.equal(ours["input_ids"][ours["attention_mask"].bool()],
                       theirs["input_ids"][theirs["attention_mask"].bool()])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    free = JanusFamily(model).inputs_from_ids(theirs["input_ids"], theirs["attention_mask"])  # no tokenizer at all
    for k in ("input_ids", "attention_mask", "uncond_attention_mask"):
        assert torch.equal(free[k], theirs["attention_mask"] if "mask" in k else theirs["input_ids"])
    valid = theirs["attention_mask"].bool()
    assert torch.equal(free["uncond_input_ids"][valid], ours["uncond_input_ids"][valid])
    pipe = SpeculativeImagePipeline(model=model, vq=model.model.vqmodel, tokenizer=processor)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(RAGGED, do_sample=False, decoding="jacobi", window=5, output_type="latent")
    ref = make_pipe(model)(RAGGED, do_sample=False, decoding="ar", output_type="latent")
    assert torch.equal(out.tokens, ref.tokens)
    with pytest.raises(ValueError, match="image-start token"):
        JanusFamily(model).inputs_from_ids(torch.tensor([[BOS, 7, 8]]))


def test_negative_prompt_replaces_uncond_branch(pipe):
    inputs = pipe.family.prefill_inputs(["a red circle"], negative_prompts=["blue"])
    row = inputs["uncond_input_ids"][0][inputs["uncond_attention_mask"][0].bool()].tolist()
    assert row == [BOS, WORDS.index("blue"), BOI]
    out = pipe("a red circle", negative_prompt="blue", do_sample=False, decoding="jacobi", output_type="latent")
    ref = pipe("a red circle", negative_prompt="blue", do_sample=False, decoding="ar", output_type="latent")
    assert torch.equal(out.tokens, ref.tokens)


def test_missing_tokenizer_and_wrong_models():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny_janus(hidden=16, layers=1)
    pipe = SpeculativeImagePipeline(model=model, vq=model.model.vqmodel)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="tokenizer"):
        pipe("a red circle")
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert not JanusFamily.matches(llama) and JanusFamily.matches(model)
    with pytest.raises(TypeError, match="JanusForConditionalGeneration"):
        JanusLM(llama)
    good = make_pipe(model)
    with pytest.raises(TypeError, match="no image-generation family"):
        good("a red circle", decoding="draft", draft_model=llama)
    with pytest.raises(ValueError, match="own VQ-VAE"):
        JanusFamily(model, tokenizer=tiny_tokenizer(), vq=torch.nn.Linear(1, 1))
