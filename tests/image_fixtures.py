"""A tiny text-to-image stack built locally: word tokenizer, joint-vocabulary Llama, diffusers VQModel."""

import torch

WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "red", "blue", "green", "circle", "square", "on", "background"]
CODES = 16
GRID = 4


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def tiny_image_lm(seed=0, hidden=32, layers=2, eol=False, dtype=torch.float64, sharpen=3.0, grid=GRID, codes=CODES):
    from transformers import LlamaConfig, LlamaForCausalLM

    offset = len(WORDS)
    boi = offset + codes
    eoi = boi + 1
    eol_id = eoi + 1 if eol else None
    vocab = eoi + 1 + bool(eol)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    cfg.image_layout = dict(height=grid, width=grid, image_token_offset=offset, codebook_size=codes,
                            eoi_token_id=eoi, eol_token_id=eol_id)
    cfg.boi_token_id = boi
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    return model


def tiny_vq(seed=0, codes=CODES):
    """A random diffusers VQModel: 16x16 pixels <-> 4x4 codes (a 2x2 grid decodes to 8x8 pixels)."""
    from diffusers import VQModel

    torch.manual_seed(seed)
    return VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                   up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
                   latent_channels=4, num_vq_embeddings=codes, norm_num_groups=4, vq_embed_dim=4,
                   sample_size=16).eval()


def tiny_pipeline(**kw):
    from mmspec.pipelines import SpeculativeImagePipeline

    pipe = SpeculativeImagePipeline(model=tiny_image_lm(**kw), vq=tiny_vq(codes=kw.get("codes", CODES)),
                                    tokenizer=tiny_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe
