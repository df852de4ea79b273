"""Emu3 family: mmspec's AR / speculative image generation against transformers' own Emu3 generate.

The family contract (tests/family_contract.py) runs for both vocabularies below, with that generate as its AR
reference.

Tiny random Emu3ForConditionalGeneration models (float64, hidden 32, 2 layers) with a word-level tokenizer that has
Emu3's special tokens, an Emu3Processor around it, and a tiny Emu3 VQ-VAE; no downloads. The grid is 3 x 4 (ratio
"4:3", image_area 768), so height / width mix-ups show. The "scattered" vocabulary puts the visual tokens at
permuted, non-contiguous ids (text tokens in between) to exercise the code <-> token-id mapping.

The reference is ``Emu3ForConditionalGeneration.generate`` run as transformers' Emu3 docs run it for images: the
docs' ``prefix_allowed_tokens_fn`` (visual tokens, end-of-line after each row, then end-of-frame, end-of-image, EOS)
and a negative prompt for classifier-free guidance (``negative_prompt_ids`` ->
``UnbatchedClassifierFreeGuidanceLogitsProcessor``), greedy. The negative prompts carry the size header (BAAI's
reference code; the family's default). transformers' unconditional branch derives position ids without the
attention mask, so the negative prompts of a batch are given equal token lengths (no padding) there.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import mmspec.models.emu3  # noqa: E402,F401  (registers the family)
from mmspec.models.emu3 import END, Emu3Family, Emu3Layout  # noqa: E402
from mmspec.models.families import family_for  # noqa: E402
from mmspec.models.image_tokens import AFTER, EOL, IMAGE  # noqa: E402
from mmspec.pipelines import SpeculativeImagePipeline  # noqa: E402

from family_contract import FamilyContract  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|extra_203|>", "<|extra_204|>", "<|image start|>", "<|image end|>", "<|image token|>",
           "<|extra_200|>", "<|extra_201|>", "<image>", "<unk>"]
WORDS = ["a", "red", "blue", "green", "cat", "dog", "on", "grass", "blurry", "ugly", "dark", "*"]
WORDS += [str(d) for d in range(10)]
CODES = 12
H, W = 3, 4  # ratio "4:3" (width:height), image_area 768 -> 3 x 4 tokens -> 24 x 32 pixels
PROMPTS = ["a red cat on grass", "blue dog", "a green cat"]
NEGATIVES = ["blurry", "ugly", "dark"]  # equal token lengths (see the module docstring)


def emu3_vocab(scatter: bool) -> dict:
    visual = [f"<|visual token{i:06d}|>" for i in range(CODES)]
    if not scatter:
        names = SPECIAL + WORDS + visual
    else:  # visual tokens permuted and interleaved with text tokens: ids neither contiguous nor in code order
        perm = torch.randperm(CODES, generator=torch.Generator().manual_seed(7)).tolist()
        names, words = list(SPECIAL), list(WORDS)
        for k, i in enumerate(perm):
            names.append(visual[i])
            if k % 3 == 1 and words:
                names.append(words.pop(0))
        names += words
    return {n: i for i, n in enumerate(names)}


def emu3_processor(scatter: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Emu3ImageProcessor, Emu3Processor, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(emu3_vocab(scatter), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|extra_203|>", eos_token="<|extra_204|>", pad_token="<|endoftext|>",
        unk_token="<unk>", extra_special_tokens={
            "image_token": "<image>", "boi_token": "<|image start|>", "eoi_token": "<|image end|>",
            "image_wrapper_token": "<|image token|>", "eof_token": "<|extra_201|>"})
    processor = Emu3Processor(Emu3ImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3), tokenizer)
    processor.ratio, processor.image_area = "4:3", 768
    return processor


def emu3_model(processor, seed=0, hidden=32, layers=2, sharpen=4.0):
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    tok = processor.tokenizer
    torch.manual_seed(seed)
    config = Emu3Config(
        vocabulary_map=tok.get_vocab(),
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, initializer_range=0.2, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vq_config=dict(codebook_size=CODES, embed_dim=4, latent_channels=4, base_channels=32, hidden_size=32,
                       channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[],
                       temporal_downsample_factor=1))
    model = Emu3ForConditionalGeneration(config).to(torch.float64).eval()
    model.model.vqmodel.float()  # exactness is asserted on tokens; pixels only need float32
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    return model


def emu3_pipeline(scatter=False, **kw):
    processor = emu3_processor(scatter)
    pipe = SpeculativeImagePipeline(model=emu3_model(processor, **kw), vq=None, tokenizer=processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def transformers_generate(model, processor, prompts, negatives, scale, negative_header=True):
    """Emu3's own image generation (transformers docs recipe), greedy: returns the generated spans [B, L].

    ``negative_header=False`` is the docs' exact form (negative prompt without the size header)."""
    tok = processor.tokenizer
    inputs = processor(text=prompts, return_for_image_generation=True, padding=True, padding_side="left",
                       return_tensors="pt")
    height, width = inputs.pop("image_sizes")[0]
    neg = processor(text=negatives, return_for_image_generation=negative_header, padding=True, padding_side="left",
                    return_tensors="pt")
    assert bool(neg.attention_mask.all()), "unpadded negative prompts only (see the module docstring)"
    visual = model.vocabulary_mapping.image_tokens
    eol = model.vocabulary_mapping.eol_token_id

    def prefix_allowed_tokens_fn(batch_id, input_ids):  # as in transformers' Emu3 docs
        position = torch.nonzero(input_ids == tok.image_wrapper_token_id, as_tuple=True)[0][0]
        offset = input_ids.shape[0] - position
        if offset % (width + 1) == 0:
            return [eol]
        if offset == (width + 1) * height + 1:
            return [tok.eof_token_id]
        if offset == (width + 1) * height + 2:
            return [tok.eoi_token_id]
        if offset == (width + 1) * height + 3:
            return [tok.eos_token_id]
        if offset > (width + 1) * height + 3:
            return [tok.pad_token_id]
        return visual

    out = model.generate(**inputs, max_new_tokens=(width + 1) * height + 6, do_sample=False, guidance_scale=scale,
                         prefix_allowed_tokens_fn=prefix_allowed_tokens_fn, negative_prompt_ids=neg.input_ids,
                         negative_prompt_attention_mask=neg.attention_mask, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, return_dict_in_generate=True)
    return out.sequences[:, inputs.input_ids.shape[1]:], (int(height), int(width))


_PIPES = {}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: intra-op threads only add contention on a shared machine (10x slower walls seen)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cached_pipeline(scatter: bool):
    if scatter not in _PIPES:
        _PIPES[scatter] = emu3_pipeline(scatter=scatter)
    return _PIPES[scatter]


@pytest.fixture(params=[False, True], ids=["contiguous", "scattered"])
def pipe(request):
    return cached_pipeline(request.param)


def test_layout_and_prompts(pipe):
    family = pipe.family
    assert isinstance(family, Emu3Family)
    layout = family.layout()
    tok = pipe.tokenizer.tokenizer
    mapping = pipe.model.vocabulary_mapping
    assert isinstance(layout, Emu3Layout) and (layout.height, layout.width) == (H, W)
    assert layout.row_stride == W + 1 and layout.num_tokens == H * (W + 1) + 3
    assert layout.eol_token_id == tok.convert_tokens_to_ids("<|extra_200|>") == mapping.eol_token_id
    assert layout.end_token_ids == (tok.eof_token_id, tok.eoi_token_id, tok.eos_token_id)
    kinds = layout.kind(torch.arange(layout.num_tokens + 2)).tolist()
    assert kinds == ([IMAGE] * W + [EOL]) * H + [END, END + 1, END + 2, AFTER, AFTER]
    allowed = layout.allowed(len(tok))
    assert allowed[IMAGE].nonzero().flatten().tolist() == sorted(mapping.image_tokens)
    ids = layout.image_ids().tolist()
    assert ids == [mapping.img2bpe[c] for c in range(CODES)]
    assert (layout.image_token_ids is not None) == (ids != list(range(ids[0], ids[0] + CODES)))
    assert (layout.image_token_ids is not None) == (pipe is cached_pipeline(True))  # scattered ids really are
    codes = torch.randint(0, CODES, (2, H * W), generator=torch.Generator().manual_seed(0))
    span = mapping.convert_img2bpe(codes.view(2 * H, W)).view(2, -1)  # Emu3's own code -> token mapping + EOL
    assert torch.equal(layout.to_grid(span), codes)
    with pytest.raises(ValueError, match="not image tokens"):
        layout.to_grid(torch.full((1, layout.num_tokens), tok.eos_token_id))

    # prompts: exactly what Emu3Processor(return_for_image_generation=True) builds; uncond = negative + header
    inputs = family.prefill_inputs(PROMPTS, NEGATIVES)
    ref = pipe.tokenizer(text=PROMPTS, return_for_image_generation=True)["input_ids"]
    neg = pipe.tokenizer(text=NEGATIVES, return_for_image_generation=True)["input_ids"]
    for b, (r, n) in enumerate(zip(ref, neg)):
        assert inputs["input_ids"][b][inputs["attention_mask"][b].bool()].tolist() == r
        assert inputs["uncond_input_ids"][b][inputs["uncond_attention_mask"][b].bool()].tolist() == n
    header = family.header_ids(H, W)
    assert header[0] == tok.boi_token_id and header[-1] == tok.image_wrapper_token_id
    assert tok.decode(header[1:-1]).replace(" ", "") == f"{H}*{W}"
    empty = family.prefill_inputs(PROMPTS)
    for b in range(len(PROMPTS)):
        row = empty["uncond_input_ids"][b][empty["uncond_attention_mask"][b].bool()].tolist()
        assert row == [tok.bos_token_id] + header
    # tokenizer-free path: pre-built ids give the same inputs; the grid is read from the header
    bare = Emu3Family(pipe.model)
    again = bare.prefill_inputs([list(r) for r in ref])
    assert bare.grid_size() == (H, W) and bare.layout() == layout
    for key in ("input_ids", "attention_mask", "uncond_input_ids", "uncond_attention_mask"):
        assert torch.equal(again[key], empty[key]), key


class TestEmu3(FamilyContract):
    family_class = Emu3Family
    reference_scales = (3.0,)
    pixel_size = (8 * H, 8 * W)
    bad_inputs = {
        "class-labels": (dict(prompt="a red cat", class_labels=[3]), "text-conditioned"),
        "no-prompt": (dict(prompt=None), "`prompt`"),
    }

    def conditions(self, pipe):
        return dict(prompt=PROMPTS, negative_prompt=NEGATIVES)

    def reference_tokens(self, pipe, scale):
        span, grid = transformers_generate(pipe.model, pipe.tokenizer, PROMPTS, NEGATIVES, scale)
        layout = pipe.family.layout()
        assert grid == (H, W) and span.shape == (len(PROMPTS), layout.num_tokens)
        forced = layout.forced_token(layout.kind(torch.arange(layout.num_tokens)))
        assert torch.equal(span[:, forced >= 0], forced[forced >= 0].expand(len(PROMPTS), -1))
        codes = pipe.model.vocabulary_mapping.convert_bpe2img(span[:, :-3].reshape(-1, H, W + 1)).long()
        return codes.view(len(PROMPTS), H * W)

    def make_draft(self, pipe, name):
        return emu3_model(pipe.tokenizer, seed=5, hidden=16, layers=1)

    def after_load(self, pipe, again):
        # the image size is a call-time setting of Emu3Processor (set on the instance here), not saved with it
        again.tokenizer.ratio, again.tokenizer.image_area = pipe.tokenizer.ratio, pipe.tokenizer.image_area


def test_ar_with_empty_negative_prompts_equals_transformers_generate():
    pipe = cached_pipeline(False)
    scale = 3.0
    span, grid = transformers_generate(pipe.model, pipe.tokenizer, PROMPTS, [""] * len(PROMPTS), scale)
    layout = pipe.family.layout()
    assert grid == (H, W) and span.shape == (len(PROMPTS), layout.num_tokens)
    ref_codes = pipe.model.vocabulary_mapping.convert_bpe2img(span[:, :-3].reshape(-1, H, W + 1)).long()
    out = pipe(PROMPTS, do_sample=False, decoding="ar", guidance_scale=scale, output_type="latent")
    assert torch.equal(out.images, ref_codes.view(len(PROMPTS), H, W))
    assert out.stats.new_tokens == len(PROMPTS) * layout.num_tokens
    assert len({tuple(t) for t in out.tokens.tolist()}) == len(PROMPTS)


def test_guidance_matters():
    """With negative prompts, guidance changes the greedy images, so the unconditional branch is tested."""
    pipe = cached_pipeline(False)
    kw = dict(negative_prompt=NEGATIVES, do_sample=False, decoding="ar", output_type="latent")
    plain, guided = pipe(PROMPTS, guidance_scale=1.0, **kw), pipe(PROMPTS, guidance_scale=3.0, **kw)
    assert not torch.equal(plain.tokens, guided.tokens)


def test_prebuilt_ids_docs_form_equals_transformers_generate():
    """Tokenizer-free path (pre-built ids) through the shared loop, with the negative prompt exactly as in
    transformers' docs example (no size header); the whole generated span, structure tokens included, matches."""
    from mmspec.decoding import DecodeState, decode
    from mmspec.drafting import NoDraft
    from mmspec.models.image_tokens import GuidedLM
    from mmspec.sampling import LogitsPipeline

    pipe = cached_pipeline(False)
    processor, scale = pipe.tokenizer, 3.0
    span, _ = transformers_generate(pipe.model, processor, PROMPTS, NEGATIVES, scale, negative_header=False)
    cond = processor(text=PROMPTS, return_for_image_generation=True)["input_ids"]
    neg = processor(text=NEGATIVES)["input_ids"]
    family = Emu3Family(pipe.model)  # no processor: the grid comes from the prompt header
    inputs = family.prefill_inputs(cond, neg)
    layout = family.layout()
    assert layout == pipe.family.layout()
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    target = GuidedLM(pipe.model, layout, scale, adapter=family.adapter)
    state = DecodeState(ids, mask, layout.num_tokens, target.vocab_size, LogitsPipeline(do_sample=False), None,
                        ids.device)
    state, stats = decode(target, NoDraft(), state, window=1, model_kwargs=inputs)
    assert torch.equal(state.tokens[:, state.prompt_length:], span)
    with_header = pipe(PROMPTS, negative_prompt=NEGATIVES, do_sample=False, decoding="ar", guidance_scale=scale,
                       output_type="latent")
    assert not torch.equal(with_header.tokens, layout.to_grid(span))  # the header in the negative prompt matters


def test_images_match_emu3_decode():
    pipe = cached_pipeline(False)
    out = pipe(PROMPTS[:1], num_images_per_prompt=2, output_type="pt", decoding="jacobi", window=5,
               generator=torch.Generator().manual_seed(1))
    assert out.images.shape == (2, 3, 8 * H, 8 * W) and out.tokens.shape == (2, H * W)
    assert out.images.min() >= 0 and out.images.max() <= 1
    # the family's decode equals Emu3's own decode_image_tokens on the full generated span + processor postprocess
    mapping = pipe.model.vocabulary_mapping
    layout = pipe.family.layout()
    span = torch.cat([mapping.convert_img2bpe(out.tokens.view(-1, W)).view(2, -1),
                      torch.tensor(layout.end_token_ids).expand(2, -1)], dim=1)
    pixels = pipe.model.decode_image_tokens(image_tokens=span, height=H, width=W)
    ref = pipe.tokenizer.postprocess(list(pixels.float()), return_tensors="np")["pixel_values"]
    ours = (out.images * 255).clamp(0, 255).numpy()
    ref = np.stack(ref).astype(np.float64).reshape(ours.shape)  # postprocess returns channel planes
    assert np.abs(ref - ours).max() <= 1.0  # uint8 truncation vs float
    # sampling with scattered image-token ids: random Jacobi init also draws non-image ids of the span, which the
    # forced distribution rejects; the output holds image codes only
    scattered = cached_pipeline(True)
    codes = scattered(PROMPTS, do_sample=True, decoding="jacobi", window=6, output_type="latent",
                      generator=torch.Generator().manual_seed(2)).images
    assert codes.shape == (len(PROMPTS), H, W) and codes.min() >= 0 and codes.max() < CODES


def test_bad_prompts_and_processors():
    pipe = cached_pipeline(False)
    with pytest.raises(ValueError, match="text-conditioned"):
        pipe.family.prefill_inputs(["a red cat"], prompt_embeds=torch.zeros(1, 2, 4))
    for tokenizer in (None, pipe.tokenizer.tokenizer):  # a bare tokenizer cannot build the size header
        bare = SpeculativeImagePipeline(model=pipe.model, vq=None, tokenizer=tokenizer)
        bare.set_progress_bar_config(disable=True)
        with pytest.raises(ValueError, match="Emu3Processor"):
            bare("a red cat")
    family = pipe.family
    tok = pipe.tokenizer.tokenizer
    with pytest.raises(ValueError, match="size header"):
        family.prefill_inputs([[tok.bos_token_id, 10, 11]])
    wrong = [tok.bos_token_id] + family.header_ids(2, 2)
    with pytest.raises(ValueError, match="processor is set to"):
        family.prefill_inputs([wrong])
    with pytest.raises(ValueError, match="negative prompts for"):
        family.prefill_inputs(PROMPTS, NEGATIVES[:2])
    assert type(family_for(pipe.model, tokenizer=pipe.tokenizer)) is Emu3Family
