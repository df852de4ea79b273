"""Tiny random vision-language models of real transformers classes, with real processors built offline.

Each builder returns ``(model, processor)``: the model from a tiny config with random weights (eval mode),
the processor from its image-processor config and a word-level tokenizer made locally with the
``tokenizers`` library (no downloads). The word list holds the zoo's scene-caption vocabulary plus a few
prompt words, so prompts like ``"describe the image"`` tokenize without unknowns.
"""

from __future__ import annotations

import numpy as np
import torch

from mmspec.zoo.data import SCENE_VOCAB

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PROMPT_WORDS = ["describe", "image", "caption", "what", "is", "in", "this", "picture", "please", "briefly", "en",
                "user", "assistant", ":", "?"]


def word_tokenizer(extra_special: list[str] = (), add_bos: bool = True, words=None):
    """A word-level ``PreTrainedTokenizerFast`` (left padding) over specials + scene vocabulary + prompt words.

    ``extra_special`` tokens (image placeholders and the like) are added as special tokens, so they split out of
    text even without surrounding spaces, as the processors write them.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab_words = list(SPECIALS) + sorted(set(words or (list(SCENE_VOCAB) + PROMPT_WORDS)) - set(SPECIALS))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab_words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left", model_max_length=4096)
    if extra_special:
        fast.add_special_tokens({"additional_special_tokens": list(extra_special)})
    return fast


def _tiny_llama_config(vocab_size: int, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _finish(model, dtype, sharpen: float, attention_scale: float = 8.0):
    """eval mode, dtype, a sharper output head (random init is near uniform: every drafter would agree), and
    sharper text attention (scaled query/key projections), so that wrong positions or masks change the text."""
    model = model.to(dtype).eval()
    language_model = model.get_decoder() if hasattr(model, "get_decoder") else model
    with torch.no_grad():
        for name, module in language_model.named_modules():
            if name.endswith(("q_proj", "k_proj")) and hasattr(module, "weight"):
                module.weight.mul_(attention_scale)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    with torch.no_grad():
        w = head.weight.detach().clone()
        if head.weight.data_ptr() == embed.weight.data_ptr():
            # A tied random head mostly predicts the input token again (residual stream ~ its embedding):
            # untie it so greedy text does not degenerate into repeats.
            w = torch.randn_like(w) * w.std()
            for cfg in (model.config, model.config.get_text_config()):
                cfg.tie_word_embeddings = False
        head.weight = torch.nn.Parameter(w * sharpen)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    model.generation_config.bos_token_id = 1
    return model


def tiny_llava(seed: int = 0, dtype=torch.float64, image_size: int = 32, patch: int = 8, hidden: int = 32,
               layers: int = 2, sharpen: float = 8.0):
    """A tiny random ``LlavaForConditionalGeneration`` and a real ``LlavaProcessor`` (CLIP image processor).

    The CLIP vision tower sees ``image_size`` x ``image_size`` pixels in ``patch`` x ``patch`` patches, so every
    image becomes ``(image_size // patch) ** 2`` placeholder tokens (the CLS feature is dropped, strategy
    ``"default"``). Returns ``(model, processor)``.
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = word_tokenizer(["<image>"])
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>")
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=image_size, patch_size=patch, projection_dim=16)
    config = LlavaConfig(vision_config=vision, text_config=_tiny_llama_config(len(tokenizer), hidden, layers),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config)
    return _finish(model, dtype, sharpen), processor


def random_images(n: int, seed: int = 0, sizes=((32, 32),)):
    """``n`` random uint8 HWC numpy images; sizes cycle through ``sizes`` (height, width)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(n)]


QWEN_SPECIALS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>"]


def tiny_qwen2_vl(seed: int = 0, dtype=torch.float64, version: str = "2", sharpen: float = 8.0):
    """A tiny random Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``) and a real processor.

    The image processor keeps each image's aspect ratio (4 x 4 pixel patches merged 2 x 2), so images of
    different sizes get different numbers of placeholder tokens and different 3-D rope positions.
    """
    import transformers as tf

    tokenizer = word_tokenizer(QWEN_SPECIALS)
    image_processor = tf.Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                               min_pixels=8 * 8, max_pixels=32 * 32)
    processor_cls = tf.Qwen2VLProcessor if version == "2" else tf.Qwen2_5_VLProcessor
    video_processor = tf.Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2)
    processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                              chat_template=QWEN_CHAT_TEMPLATE)
    torch.manual_seed(seed)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 100.0},
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if version == "2":
        vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2, mlp_ratio=2)
        config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **special)
        model = tf.Qwen2VLForConditionalGeneration(config)
    else:
        vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=32, window_size=16, fullatt_block_indexes=[1])
        config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
        model = tf.Qwen2_5_VLForConditionalGeneration(config)
    return _finish(model, dtype, sharpen), processor


IDEFICS_SPECIALS = (["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
                    + [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)])


def tiny_idefics3(seed: int = 0, dtype=torch.float64, smolvlm: bool = False, sharpen: float = 8.0):
    """A tiny random Idefics3 (or SmolVLM, ``smolvlm=True``) with a real processor that splits images.

    Sub-images are 32 x 32 (8 x 8 pixel patches, pixel shuffle 2 -> 4 tokens each); images larger than that
    are split into a grid plus a global view, so rows differ in image count and prompt length, and
    ``pixel_values`` [B, N, 3, 32, 32] is zero-padded with a ``pixel_attention_mask``.
    """
    import transformers as tf

    tokenizer = word_tokenizer(IDEFICS_SPECIALS)
    kw = dict(do_resize=True, size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
              do_image_splitting=True)
    torch.manual_seed(seed)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    text = _tiny_llama_config(len(tokenizer)).to_dict()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if smolvlm:
        try:
            processor = tf.SmolVLMProcessor(image_processor=tf.SmolVLMImageProcessor(**kw), tokenizer=tokenizer,
                                            video_processor=tf.SmolVLMVideoProcessor(), image_seq_len=4)
        except ImportError:  # SmolVLMProcessor needs `num2words`; Idefics3's writes the same image-token layout
            processor = tf.Idefics3Processor(image_processor=tf.Idefics3ImageProcessor(**kw), tokenizer=tokenizer,
                                             image_seq_len=4)
        config = tf.SmolVLMConfig(vision_config=vision, text_config=text, scale_factor=2, image_token_id=image_id)
        model = tf.SmolVLMForConditionalGeneration(config)
    else:
        processor = tf.Idefics3Processor(image_processor=tf.Idefics3ImageProcessor(**kw), tokenizer=tokenizer,
                                         image_seq_len=4)
        config = tf.Idefics3Config(vision_config=vision, text_config=text, scale_factor=2, image_token_id=image_id)
        model = tf.Idefics3ForConditionalGeneration(config)
    return _finish(model, dtype, sharpen), processor


def tiny_paligemma(seed: int = 0, dtype=torch.float64, sharpen: float = 8.0):
    """A tiny random PaliGemma (Gemma text model, SigLIP vision) and a real ``PaliGemmaProcessor``.

    PaliGemma numbers positions from 1 and lets the prefix (image + prompt) attend bidirectionally
    (``token_type_ids``); the processor appends ``<loc>``/``<seg>`` tokens to the vocabulary.
    """
    import transformers as tf

    tokenizer = word_tokenizer(["<image>"])
    image_processor = tf.SiglipImageProcessor(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16
    processor = tf.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    torch.manual_seed(seed)
    vision = tf.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=32, patch_size=8, projection_dim=32)
    text = tf.GemmaConfig(vocab_size=len(processor.tokenizer), hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                          max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = tf.PaliGemmaConfig(vision_config=vision, text_config=text, projection_dim=32,
                                image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>"))
    model = tf.PaliGemmaForConditionalGeneration(config)
    return _finish(model, dtype, sharpen), processor


def tiny_llava_next(seed: int = 0, dtype=torch.float64, sharpen: float = 8.0):
    """A tiny random LLaVA-NeXT (any-resolution tiles + newline embeddings) and its real processor.

    Not a family mmspec names anywhere: it runs through the same ``VisionLM`` adapter. Images of different
    aspect ratios pick different tile grids, so rows get different numbers of image tokens.
    """
    import transformers as tf

    tokenizer = word_tokenizer(["<image>"])
    pinpoints = [[32, 32], [32, 64], [64, 32]]
    image_processor = tf.LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=pinpoints)
    processor = tf.LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                      vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                      image_token="<image>")
    torch.manual_seed(seed)
    vision = tf.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=32, patch_size=8, projection_dim=16)
    config = tf.LlavaNextConfig(vision_config=vision, text_config=_tiny_llama_config(len(tokenizer)),
                                image_token_id=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
                                vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = tf.LlavaNextForConditionalGeneration(config)
    return _finish(model, dtype, sharpen), processor


#: A minimal Qwen-style chat template (real checkpoints ship their own).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: family name -> (builder, the processor's image placeholder in a prompt, or "" when the processor adds it)
FAMILIES = {
    "llava": (tiny_llava, "<image>"),
    "qwen2_vl": (lambda seed=0, **kw: tiny_qwen2_vl(seed, version="2", **kw), "<|vision_start|><|image_pad|><|vision_end|>"),
    "qwen2_5_vl": (lambda seed=0, **kw: tiny_qwen2_vl(seed, version="2.5", **kw),
                   "<|vision_start|><|image_pad|><|vision_end|>"),
    "idefics3": (tiny_idefics3, "<image>"),
    "smolvlm": (lambda seed=0, **kw: tiny_idefics3(seed, smolvlm=True, **kw), "<image>"),
    "paligemma": (tiny_paligemma, ""),
    "llava_next": (tiny_llava_next, "<image>"),
}

PROMPTS = ["describe the image", "what is in this picture please describe briefly", "caption", "what is this"]
#: (height, width) of the test images: square, tall and wide, so tiled/any-resolution processors differ per row
SIZES = ((32, 32), (64, 32), (32, 64), (48, 40))


def family_batch(family: str, processor, batch: int, seed: int = 0):
    """Processor outputs for ``batch`` rows with different images, image sizes and prompt lengths (one image per
    row, placed first or last): ``dict`` with ``input_ids``, ``attention_mask`` and the rest."""
    _, placeholder = FAMILIES[family]
    images = random_images(batch, seed=seed, sizes=SIZES)
    texts = []
    for i in range(batch):
        prompt = PROMPTS[i % len(PROMPTS)]
        if placeholder:
            prompt = f"{placeholder} {prompt}" if i % 2 == 0 else f"{prompt} {placeholder}"
        texts.append(prompt)
    return dict(processor(images=[[im] for im in images], text=texts, padding=True, return_tensors="pt"))
