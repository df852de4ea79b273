"""Chameleon family (Lumina-mGPT / Anole through transformers' ChameleonForConditionalGeneration).

Reference for the AR path: transformers' own ``generate`` (greedy) on the same model, with transformers' own
classifier-free guidance (``guidance_scale`` + ``negative_prompt_ids`` -> ``UnbatchedClassifierFreeGuidance``
LogitsProcessor) and a structural-forcing logits processor written here from the references' procedures
(Lumina-mGPT's ``MultiModalLogitsProcessor``; Anole's ``AllowOnlyTokensLogitsProcessor(image_tokens)`` + forced
``<eoss>``). Two things differ from a plain ``generate`` call and are explained where they happen:

* transformers' ``ChameleonForConditionalGeneration.forward`` sets every image-token logit to ``finfo.min`` (it is
  a text-output model in transformers), which makes image generation impossible; for the reference that mask list
  is emptied for the duration of the call (the forward is otherwise transformers' own). Lumina-mGPT's fork does the
  same with ``mask_image_logits=False``.
* transformers' CFG combines log-softmaxed scores, ``lsm(u) + s (lsm(c) - lsm(u))``, which differs from the
  references' raw-logit ``u + s (c - u)`` by a per-row constant, so the greedy argmax is the same (float64 here).

Tiny float64 models built from configs (random weights), a tiny word-level tokenizer over a Chameleon-like
vocabulary whose image tokens name their codes in a *permuted* order (so the id -> code mapping is exercised).
The family contract (tests/family_contract.py) runs for both styles with that ``generate`` as its AR reference.
"""

import os
from contextlib import contextmanager

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

import mmspec.models.chameleon as chameleon  # noqa: E402  (registers the family)
from mmspec.models.chameleon import (  # noqa: E402
    ChameleonFamily,
    ChameleonVQDecoder,
    configure_chameleon,
    detect_style,
    image_token_codes,
)
from mmspec.models.families import family_for  # noqa: E402
from mmspec.pipelines import SpeculativeImagePipeline  # noqa: E402

from family_contract import FamilyContract  # noqa: E402

WORDS = ["a", "red", "blue", "green", "circle", "square", "on", "background"]
CODES = 16
GRID = 4
PERM = [(5 * i + 3) % CODES for i in range(CODES)]  # code of image token 4 + i
PROMPTS = ["a red circle", "green", "blue square on green background"]
STYLES = ["lumina-mgpt", "anole"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops on a loaded 2-core machine: a second OpenMP thread only spins (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def code_name(code: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def tiny_vocab() -> dict:
    names = ["<s>", "<pad>", "</s>", "<unk>"] + [code_name(PERM[i]) for i in range(CODES)]
    names += ["<eoss>", "<racm3:break>", "<reserved08706>", "<reserved08799>"]
    names += [f"<reserved{8800 + n:05d}>" for n in range(5)] + ["<image>"] + WORDS
    return {n: i for i, n in enumerate(names)}


def tiny_chameleon(style, seed=0, hidden=32, layers=2, sharpen=3.0):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    vocab = tiny_vocab()
    torch.manual_seed(seed)
    cfg = ChameleonConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0,
        eos_token_id=2, pad_token_id=1, vocabulary_map=vocab,
        vq_config=dict(embed_dim=8, num_embeddings=CODES, latent_channels=8, resolution=8, in_channels=3,
                       base_channels=32, channel_multiplier=[1, 1], num_res_blocks=1),
    )
    model = ChameleonForConditionalGeneration(cfg).to(torch.float64).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)  # peaked distributions, no near-ties
    # the tiny word tokenizer cannot spell Lumina's instruction template; its format is tested separately
    return configure_chameleon(model, style=style, height=GRID, width=GRID, prompt_template="{prompt}")


def tiny_tokenizer():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = tiny_vocab()
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in vocab if n.startswith("<")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", sep_token="<reserved08706>")


def tiny_pipeline(style, vq=True, **kw):
    model = tiny_chameleon(style, **kw)
    pipe = SpeculativeImagePipeline(model=model, vq=ChameleonVQDecoder.from_chameleon(model) if vq else None,
                                    tokenizer=tiny_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=STYLES)
def pipe(request):
    return tiny_pipeline(request.param)


# ------------------------------------------------------------------------------------------------------
# transformers' own generate as the reference
# ------------------------------------------------------------------------------------------------------


@contextmanager
def image_logits_unmasked(model):
    """Empty the list of ids transformers' Chameleon forward masks to finfo.min (everything else unchanged)."""
    mapping = model.model.vocabulary_mapping
    mapping.__dict__["image_tokens"] = []
    try:
        yield
    finally:
        del mapping.__dict__["image_tokens"]


class StructureForcing(LogitsProcessor):
    """Lumina-mGPT's MultiModalLogitsProcessor (eol given) or Anole's image-only + forced <eoss> (eol None),
    indexed by the number of tokens generated after the prompt (which ends with the size header)."""

    def __init__(self, prompt_len, image_ids, height, width, eol, eoi):
        self.prompt_len, self.image_ids = prompt_len, torch.tensor(image_ids)
        self.h, self.w, self.eol, self.eoi = height, width, eol, eoi

    def __call__(self, input_ids, scores):
        n = input_ids.shape[1] - self.prompt_len
        out = torch.full_like(scores, float("-inf"))
        if self.eol is not None and (n + 1) % (self.w + 1) == 0:
            out[:, self.eol] = 0
        elif n == ((self.w + 1) * self.h if self.eol is not None else self.h * self.w):
            out[:, self.eoi] = 0
        else:
            out[:, self.image_ids] = scores[:, self.image_ids]
        return out


def transformers_generate(model, cond_ids, uncond_ids, scale, style):
    vocab = model.config.vocabulary_map
    eol = vocab["<reserved08799>"] if style == "lumina-mgpt" else None
    image_ids = sorted(v for k, v in vocab.items() if k.startswith("IMGIMG"))
    n_new = GRID * (GRID + 1) + 1 if eol is not None else GRID * GRID + 1
    forcing = StructureForcing(len(cond_ids), image_ids, GRID, GRID, eol, vocab["<eoss>"])
    cond, uncond = torch.tensor([cond_ids]), torch.tensor([uncond_ids])
    with image_logits_unmasked(model), torch.no_grad():
        out = model.generate(cond, attention_mask=torch.ones_like(cond), max_new_tokens=n_new, min_new_tokens=n_new,
                             do_sample=False, guidance_scale=scale, negative_prompt_ids=uncond,
                             negative_prompt_attention_mask=torch.ones_like(uncond),
                             logits_processor=LogitsProcessorList([forcing]), pad_token_id=1)
    return out[0, len(cond_ids):]


def test_transformers_forward_masks_image_tokens():
    """Why ChameleonLM.call_model exists: transformers' forward forbids image tokens."""
    model = tiny_chameleon("anole")
    ids = torch.tensor([[0, 30, 22, 21]])
    with torch.no_grad():
        masked = model(ids).logits
        unmasked = chameleon.ChameleonLM(model).call_model(ids, torch.ones_like(ids), torch.arange(4)[None], None)[0]
    image_ids = sorted(image_token_codes(model.config.vocabulary_map))
    assert (masked[..., image_ids] == torch.finfo(masked.dtype).min).all()
    assert torch.allclose(unmasked[..., 24:], masked[..., 24:]) and (unmasked[..., image_ids] > -1e3).all()


def transformers_codes(pipe, negatives, scale):
    """Each prompt alone through transformers' generate -> code grids [B, h * w] (mmspec runs the batch)."""
    family = pipe.family
    inputs = family.prefill_inputs(PROMPTS, negatives)
    layout = family.layout()
    grids = []
    for b in range(len(PROMPTS)):
        cond = inputs["input_ids"][b][inputs["attention_mask"][b].bool()].tolist()
        uncond = inputs["uncond_input_ids"][b][inputs["uncond_attention_mask"][b].bool()].tolist()
        span = transformers_generate(pipe.model, cond, uncond, scale, family.style)
        assert len(span) == layout.num_tokens
        assert span[-1] == pipe.model.config.vocabulary_map["<eoss>"]
        grids.append(layout.to_grid(span[None])[0])
    return torch.stack(grids)


class TestChameleon(FamilyContract):
    family_class = ChameleonFamily
    reference_scales = (3.0,)
    pixel_size = (2 * GRID, 2 * GRID)
    bad_inputs = {
        "labels-only": (dict(prompt=None, class_labels=[3]), "text-conditioned"),
        "class-labels": (dict(prompt="a red circle", class_labels=[3]), "text-conditioned"),
        "prompt-embeds": (dict(prompt="a red circle", prompt_embeds=torch.zeros(1, 2, 4)), "text-conditioned"),
        "no-prompt": (dict(prompt=None), "pass `prompt`"),
    }

    def conditions(self, pipe):
        return dict(prompt=PROMPTS)

    def reference_tokens(self, pipe, scale):
        return transformers_codes(pipe, None, scale)

    def make_draft(self, pipe, name):
        return tiny_chameleon(pipe.family.style, seed=5, layers=1)

    def check_speculative(self, pipe, name, out, ar):
        assert out.stats.target_forwards <= pipe.family.layout().num_tokens  # AR: one forward per token

    def after_load(self, pipe, again):
        assert isinstance(again.vq, ChameleonVQDecoder) and again.family.style == pipe.family.style


def test_ar_with_negative_prompts_equals_transformers_generate():
    """Negative prompts of different lengths: left-padded unconditional rows in mmspec, unpadded in transformers."""
    pipe = tiny_pipeline("lumina-mgpt")
    negatives = ["red", "a blue circle on background", "square"]
    out = pipe(PROMPTS, negative_prompt=negatives, do_sample=False, decoding="ar", guidance_scale=3.0,
               output_type="latent")
    assert torch.equal(out.tokens, transformers_codes(pipe, negatives, 3.0))
    assert len(set(map(tuple, out.tokens.tolist()))) == len(PROMPTS)  # different prompts, different images


# ------------------------------------------------------------------------------------------------------
# prompts, layout, vocabulary
# ------------------------------------------------------------------------------------------------------


def test_vocabulary_mapping_and_layout():
    model = tiny_chameleon("lumina-mgpt")
    family = ChameleonFamily(model)
    assert image_token_codes(model.config.vocabulary_map) == model.model.vocabulary_mapping.bpe2img
    layout = family.layout()
    assert (layout.image_token_offset, layout.codebook_size, layout.token_codes) == (4, CODES, tuple(PERM))
    assert (layout.eol_token_id, layout.eoi_token_id) == (23, 20) and layout.num_tokens == GRID * (GRID + 1) + 1
    span = torch.tensor([[4 + i for i in range(GRID)] + [23]] * GRID).flatten()
    assert layout.to_grid(torch.cat([span, torch.tensor([20])])[None]).tolist() == [PERM[:GRID] * GRID]
    codebook = model.model.vqmodel.quantize.embedding.weight
    assert torch.equal(family.codebook(), codebook[PERM])
    anole = ChameleonFamily(tiny_chameleon("anole")).layout()
    assert anole.eol_token_id is None and anole.eoi_token_id == 20 and anole.num_tokens == GRID * GRID + 1


def test_prefill_rows_per_style():
    from transformers import ChameleonImageProcessor, ChameleonProcessor

    tok = tiny_tokenizer()
    v = tiny_vocab()
    text = [v["a"], v["red"], v["circle"]]
    for style, header, uncond in [
        ("lumina-mgpt", [v["<racm3:break>"], v["<reserved08802>"], v["<reserved08802>"]], None),
        ("anole", [v["<racm3:break>"]], [v["<s>"], v["<racm3:break>"]]),
    ]:
        model = tiny_chameleon(style)
        expect = [v["<s>"]] + text + [v["<reserved08706>"]] + header
        for tokenizer in (tok, ChameleonProcessor(image_processor=ChameleonImageProcessor(), tokenizer=tok)):
            inputs = ChameleonFamily(model, tokenizer=tokenizer).prefill_inputs(["a red circle", "green"])
            assert inputs["input_ids"][0].tolist() == expect
            assert inputs["uncond_input_ids"][0].tolist() == (uncond or header)
            assert inputs["attention_mask"][1].tolist() == [0, 0] + [1] * (len(expect) - 2)
        ids_path = ChameleonFamily(model).prefill_inputs([text, [v["green"]]])  # tokenizer-free: pre-built ids
        assert ids_path["input_ids"].tolist() == inputs["input_ids"].tolist()
        negative = ChameleonFamily(model, tokenizer=tok).prefill_inputs(["a red circle"], ["red"])
        assert negative["uncond_input_ids"][0].tolist() == [v["<s>"], v["red"], v["<reserved08706>"]] + header


def test_style_detection_and_prompt_template():
    from types import SimpleNamespace as NS

    assert detect_style(NS(mask_image_logits=False)) == "lumina-mgpt"
    assert detect_style(NS(architectures=["ChameleonXLLMXForConditionalGeneration"])) == "lumina-mgpt"
    assert detect_style(NS(architectures=["ChameleonForConditionalGeneration"])) == "anole"
    assert detect_style(NS(chameleon_generation={"style": "anole"}, mask_image_logits=False)) == "anole"
    model = tiny_chameleon("anole")
    model.config.chameleon_generation = {}
    family = ChameleonFamily(model, style="lumina-mgpt", height=6, width=4)
    assert (family.style, family.height, family.width) == ("lumina-mgpt", 6, 4)
    assert family.format_prompt("a cat") == "Generate an image of 8x12 according to the following prompt:\na cat"
    assert ChameleonFamily(model).format_prompt("a cat") == "a cat"  # anole: the text itself
    assert (ChameleonFamily(model).height, ChameleonFamily(model).width) == (32, 32)  # both references' default


# ------------------------------------------------------------------------------------------------------
# images and errors
# ------------------------------------------------------------------------------------------------------


def test_images_are_the_vqgan_decode():
    """Pixels are the VQGAN decoder's decode of the codes (shapes and ranges are in the contract)."""
    pipe = tiny_pipeline("lumina-mgpt")
    pt = pipe(PROMPTS[:2], do_sample=False, output_type="pt")
    assert pt.images.shape == (2, 3, 2 * GRID, 2 * GRID) and 0 <= pt.images.min() and pt.images.max() <= 1
    with torch.no_grad():
        manual = (pipe.vq.decode_codes(pt.tokens, GRID, GRID).clamp(-1, 1) + 1) / 2
    assert torch.allclose(pt.images, manual.float())


def test_vq_decoder_checkpoint_names():
    model = tiny_chameleon("anole")
    vq = ChameleonVQDecoder.from_chameleon(model)
    keys = set(vq.state_dict())
    for key in ("quantize.embedding.weight", "post_quant_conv.weight", "decoder.conv_in.weight",
                "decoder.mid.block_1.norm1.weight", "decoder.mid.attn_1.q.weight", "decoder.mid.block_2.conv2.bias",
                "decoder.up.0.block.1.conv2.weight", "decoder.up.1.upsample.conv.weight", "decoder.norm_out.bias",
                "decoder.conv_out.weight"):
        assert key in keys, key
    assert torch.equal(vq.quantize.embedding.weight, model.model.vqmodel.quantize.embedding.weight)
    # a taming VQGAN state dict: encoder keys (transformers' encoder uses the same names) and loss keys are skipped
    other = ChameleonVQDecoder.from_vq_config(model.config.vq_config).double()
    full = {f"decoder.{k}": v for k, v in other.decoder.state_dict().items()}
    full.update({f"post_quant_conv.{k}": v for k, v in other.post_quant_conv.state_dict().items()})
    full.update({"quantize.embedding.weight": other.quantize.embedding.weight, "loss.logvar": torch.zeros(())})
    full.update({f"encoder.{k}": v for k, v in model.model.vqmodel.encoder.state_dict().items()})
    vq.load_vqgan_state_dict({"state_dict": full})
    codes = torch.arange(CODES).view(1, -1)
    assert torch.equal(vq.decode_codes(codes, 4, 4), other.decode_codes(codes, 4, 4))


def test_bad_configuration():
    model = tiny_chameleon("lumina-mgpt")
    with pytest.raises(ValueError, match="must be even"):
        ChameleonFamily(model, height=3)
    with pytest.raises(ValueError, match="unknown Chameleon image style"):
        ChameleonFamily(model, style="dalle")
    with pytest.raises(ValueError, match="needs a `tokenizer`|string prompts need a `tokenizer`"):
        ChameleonFamily(model).prefill_inputs(["a red circle"])
    pipe = SpeculativeImagePipeline(model=model, vq=None, tokenizer=tiny_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="VQGAN decoder"):
        pipe("a red circle", output_type="pt")
    assert pipe("a red circle", output_type="latent").images.shape == (1, GRID, GRID)
    family = ChameleonFamily(model)
    family._vocab = dict(family._vocab, **{code_name(PERM[0]): 40})  # an image token outside the block
    with pytest.raises(ValueError, match="contiguous"):
        family.layout()
    assert isinstance(family_for(model), ChameleonFamily)


def test_relaxed_criteria_get_token_ordered_codebook():
    """LANTERN / GSD read ``family.codebook()`` with row i = token offset + i; with delta 0 / group 1 they are exact."""
    import mmspec

    pipe = tiny_pipeline("anole", vq=False)
    kw = dict(do_sample=True, decoding="jacobi", window=6, output_type="latent")
    exact = pipe(PROMPTS[:2], generator=torch.Generator().manual_seed(3), **kw)
    lantern = pipe(PROMPTS[:2], acceptance=mmspec.acceptance.get("lantern", k=4, delta=0.0),
                   generator=torch.Generator().manual_seed(3), **kw)
    gsd = pipe(PROMPTS[:2], acceptance=mmspec.acceptance.get("gsd", group_size=1),
               generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(exact.tokens, lantern.tokens) and torch.equal(exact.tokens, gsd.tokens)
