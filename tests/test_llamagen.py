"""LlamaGen GPT + VQ tokenizer (mmspec.models.llamagen): checkpoint layout, numerics, cache semantics, I/O.

The expected key lists below are written out from LlamaGen's module layout (gpt.py / vq_model.py), and the
pinned numbers in the ``*_regression`` tests were matched against LlamaGen's own code (see the comments
there); nothing from LlamaGen is imported here.
"""

import argparse
import math

import pytest
import torch
from transformers import DynamicCache

from mmspec.models import llamagen as lg

NODROP = dict(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, attn_dropout_p=0.0)
C2I = dict(dim=32, n_layer=2, n_head=4, n_kv_head=2, vocab_size=24, num_classes=5, block_size=16, multiple_of=16,
           model_type="c2i", **NODROP)
T2I = dict(dim=32, n_layer=2, n_head=4, vocab_size=24, caption_dim=12, cls_token_num=3, block_size=16,
           multiple_of=16, model_type="t2i", **NODROP)
VQ = dict(codebook_size=16, codebook_embed_dim=4, encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2], z_channels=8, ch=32)


def det_fill(model):
    """Deterministic, RNG-free weights (sin/cos of the element index, phase from the tensor name)."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("codebook_used"):
                continue
            phase = (sum(map(ord, name)) % 97) * 0.1
            k = torch.arange(t.numel(), dtype=torch.float64)
            vals = torch.sin(k * 0.7 + phase) + 0.5 * torch.cos(k * 0.13 + 2 * phase)
            if "norm" in name and t.dim() == 1:
                vals = 1.0 + 0.1 * vals
            elif t.dim() >= 2:
                vals = vals * (1.2 / math.sqrt(t[0].numel()))
            else:
                vals = 0.1 * vals
            t.copy_(vals.view(t.shape).to(t.dtype))
    return model


def gpt(cfg=C2I, dtype=torch.float64, **over):
    return det_fill(lg.LlamaGenGPT(**{**cfg, **over}).to(dtype)).eval()


def vq(dtype=torch.float64, **over):
    return det_fill(lg.LlamaGenVQ(**{**VQ, **over}).to(dtype)).eval()


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


IDS = (torch.arange(30).view(2, 15) * 7) % 24
CAP = torch.sin(torch.arange(2 * 3 * 12, dtype=torch.float64)).view(2, 3, 12)


# ------------------------------------------------------------------------------------------------------
# configuration and checkpoint layout
# ------------------------------------------------------------------------------------------------------


def _layer_keys(i):
    return [
        f"layers.{i}.attention.wqkv.weight",
        f"layers.{i}.attention.wo.weight",
        f"layers.{i}.feed_forward.w1.weight",
        f"layers.{i}.feed_forward.w3.weight",
        f"layers.{i}.feed_forward.w2.weight",
        f"layers.{i}.attention_norm.weight",
        f"layers.{i}.ffn_norm.weight",
    ]


def test_gpt_c2i_state_dict_layout():
    sd = lg.LlamaGenGPT(**C2I).state_dict()
    expected = (["cls_embedding.embedding_table.weight", "tok_embeddings.weight"] + _layer_keys(0) + _layer_keys(1)
                + ["norm.weight", "output.weight"])
    assert list(sd) == expected
    hidden = lg.ffn_hidden_dim(32, 16)  # int(2 * 128 / 3) = 85 -> 96
    assert hidden == 96
    shapes = {
        "cls_embedding.embedding_table.weight": (6, 32),  # 5 classes + null class row
        "tok_embeddings.weight": (24, 32),
        "layers.0.attention.wqkv.weight": ((4 + 2 * 2) * 8, 32),  # n_head + 2 n_kv_head heads of 8
        "layers.0.attention.wo.weight": (32, 32),
        "layers.0.feed_forward.w1.weight": (96, 32),
        "layers.0.feed_forward.w3.weight": (96, 32),
        "layers.0.feed_forward.w2.weight": (32, 96),
        "norm.weight": (32,),
        "output.weight": (24, 32),
    }
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    # no null row without class dropout (LlamaGen: num_classes + use_cfg_embedding rows)
    assert lg.LlamaGenGPT(**{**C2I, "class_dropout_prob": 0.0}).cls_embedding.embedding_table.weight.shape[0] == 5


def test_gpt_t2i_state_dict_layout():
    sd = lg.LlamaGenGPT(**T2I).state_dict()
    expected = (["cls_embedding.uncond_embedding", "cls_embedding.cap_proj.fc1.weight",
                 "cls_embedding.cap_proj.fc2.weight", "tok_embeddings.weight"]
                + _layer_keys(0) + _layer_keys(1) + ["norm.weight", "output.weight"])
    assert sorted(sd) == sorted(expected)
    assert tuple(sd["cls_embedding.uncond_embedding"].shape) == (120, 12)  # LlamaGen's fixed 120 tokens
    assert tuple(sd["cls_embedding.cap_proj.fc1.weight"].shape) == (32, 12)
    assert tuple(sd["cls_embedding.cap_proj.fc2.weight"].shape) == (32, 32)
    assert tuple(sd["layers.1.attention.wqkv.weight"].shape) == (96, 32)  # no GQA: 3 * dim
    # the rotary table is not a weight
    assert not any("freqs" in k for k in sd)


def test_ffn_rule_and_presets():
    # LlamaGen's SwiGLU width for the public sizes (multiple_of=256)
    assert lg.ffn_hidden_dim(768, 256) == 2048
    assert lg.ffn_hidden_dim(1024, 256) == 2816
    assert lg.ffn_hidden_dim(1280, 256) == 3584
    assert lg.ffn_hidden_dim(3200, 256) == 8704
    assert lg.ffn_hidden_dim(64, 48, 1.3) == 240  # int(1.3 * 170) = 221 -> 240
    assert lg.GPT_PRESETS["GPT-B"] == dict(n_layer=12, n_head=12, dim=768)
    assert lg.GPT_PRESETS["GPT-L"] == dict(n_layer=24, n_head=16, dim=1024)
    assert lg.GPT_PRESETS["GPT-XL"] == dict(n_layer=36, n_head=20, dim=1280)
    assert lg.GPT_PRESETS["GPT-XXL"] == dict(n_layer=48, n_head=24, dim=1536)
    assert lg.GPT_PRESETS["GPT-3B"] == dict(n_layer=24, n_head=32, dim=3200)
    assert set(lg.GPT_PRESETS) == {"GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-XXXL", "GPT-1B", "GPT-3B", "GPT-7B"}
    assert lg.VQ_PRESETS["VQ-16"]["encoder_ch_mult"] == [1, 1, 2, 2, 4]
    assert lg.VQ_PRESETS["VQ-8"]["decoder_ch_mult"] == [1, 2, 2, 4]
    cfg = lg.LlamaGenConfig(**lg.GPT_PRESETS["GPT-XL"], block_size=576)
    assert (cfg.head_dim, cfg.grid_size, cfg.ffn_hidden_dim, cfg.max_position) == (64, 24, 3584, 577)
    # LlamaGen ModelArgs defaults
    d = lg.LlamaGenConfig()
    assert (d.vocab_size, d.cls_token_num, d.block_size, d.num_classes, d.caption_dim, d.class_dropout_prob) == (
        16384, 1, 256, 1000, 2048, 0.1)
    with pytest.raises(TypeError, match="unknown"):
        lg.build_gpt("GPT-B", not_a_field=1)
    with pytest.raises(ValueError, match="square"):
        lg.LlamaGenConfig(dim=32, n_head=4, block_size=15)


def _res(prefix, shortcut=False):
    keys = [f"{prefix}.{m}.{p}" for m in ("norm1", "conv1", "norm2", "conv2") for p in ("weight", "bias")]
    return keys + ([f"{prefix}.nin_shortcut.weight", f"{prefix}.nin_shortcut.bias"] if shortcut else [])


def _attn(prefix):
    return [f"{prefix}.{m}.{p}" for m in ("norm", "q", "k", "v", "proj_out") for p in ("weight", "bias")]


def _wb(prefix):
    return [f"{prefix}.weight", f"{prefix}.bias"]


def test_vq_state_dict_layout():
    # ch=32, ch_mult=[1, 2]: encoder level 0 (32 ch) + downsample, level 1 (32->64, with attention);
    # decoder conv_blocks.0 is the 64-ch level (3 res + 3 attn + upsample), conv_blocks.1 the 32-ch level.
    expected = (
        _wb("encoder.conv_in")
        + _res("encoder.conv_blocks.0.res.0") + _res("encoder.conv_blocks.0.res.1") + _wb("encoder.conv_blocks.0.downsample.conv")
        + _res("encoder.conv_blocks.1.res.0", True) + _res("encoder.conv_blocks.1.res.1")
        + _attn("encoder.conv_blocks.1.attn.0") + _attn("encoder.conv_blocks.1.attn.1")
        + _res("encoder.mid.0") + _attn("encoder.mid.1") + _res("encoder.mid.2")
        + _wb("encoder.norm_out") + _wb("encoder.conv_out")
        + _wb("decoder.conv_in")
        + _res("decoder.mid.0") + _attn("decoder.mid.1") + _res("decoder.mid.2")
        + _res("decoder.conv_blocks.0.res.0") + _res("decoder.conv_blocks.0.res.1") + _res("decoder.conv_blocks.0.res.2")
        + _attn("decoder.conv_blocks.0.attn.0") + _attn("decoder.conv_blocks.0.attn.1") + _attn("decoder.conv_blocks.0.attn.2")
        + _wb("decoder.conv_blocks.0.upsample.conv")
        + _res("decoder.conv_blocks.1.res.0", True) + _res("decoder.conv_blocks.1.res.1") + _res("decoder.conv_blocks.1.res.2")
        + _wb("decoder.norm_out") + _wb("decoder.conv_out")
        + ["quantize.embedding.weight", "quantize.codebook_used"]
        + _wb("quant_conv") + _wb("post_quant_conv")
    )
    model = lg.LlamaGenVQ(**VQ)
    sd = model.state_dict()
    assert sorted(sd) == sorted(expected)
    assert tuple(sd["quantize.embedding.weight"].shape) == (16, 4)
    assert tuple(sd["quantize.codebook_used"].shape) == (65536,)
    assert tuple(sd["quant_conv.weight"].shape) == (4, 8, 1, 1)
    assert tuple(sd["encoder.conv_blocks.0.downsample.conv.weight"].shape) == (32, 32, 3, 3)
    assert "quantize.codebook_used" not in lg.LlamaGenVQ(**VQ, codebook_show_usage=False).state_dict()
    # the VQ-16 preset: 5 levels, 128 base channels, 16x downsampling
    full = lg.LlamaGenVQConfig(**lg.VQ_PRESETS["VQ-16"])
    assert (full.ch, full.num_res_blocks, full.z_channels, full.downsample_factor) == (128, 2, 256, 16)


# ------------------------------------------------------------------------------------------------------
# GPT numerics
# ------------------------------------------------------------------------------------------------------


def test_rotary_table_values():
    # head_dim 8 -> 4 rotation pairs: pairs 0-1 rotate by the grid row, pairs 2-3 by the column, with
    # frequencies base^(-0/4) = 1 and base^(-2/4) = 0.01 (base 10000); condition rows are zero.
    t = lg.precompute_freqs_cis_2d(grid_size=3, head_dim=8, base=10000, cls_token_num=2)
    assert t.shape == (2 + 9, 4, 2) and t.dtype == torch.float32
    assert torch.equal(t[:2], torch.zeros(2, 4, 2))
    for p in range(9):
        r, c = divmod(p, 3)
        ang = torch.tensor([r * 1.0, r * 0.01, c * 1.0, c * 0.01])
        torch.testing.assert_close(t[2 + p], torch.stack([ang.cos(), ang.sin()], -1), atol=1e-6, rtol=0)


def test_condition_tokens_have_zero_rotary():
    """LlamaGen zeroes q/k of condition tokens (cos = sin = 0), so their keys contribute score 0."""
    x = torch.randn(1, 3, 2, 8, dtype=torch.float64)
    model = gpt()
    rope = model.rotary_for_positions(torch.tensor([[0, 1, 5]]))
    out = lg.apply_rotary(x, rope)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))  # position 0 = the class token
    assert out[:, 1:].abs().sum() > 0
    torch.testing.assert_close(out[:, 1], x[:, 1])  # grid cell (0, 0): zero angle
    with pytest.raises(IndexError, match="position_ids"):
        model.rotary_for_positions(torch.tensor([[17]]))  # 1 + 16 rows


def test_c2i_logits_regression():
    # Matched against LlamaGen's own Transformer (autoregressive/models/gpt.py) with the same det_fill
    # weights: identical (max |diff| 0.0) in float32, and 0.0 in float64 when LlamaGen's fp32 casts are
    # shimmed to keep float64 (1.8e-6 vs its unmodified fp32 rope/RMSNorm/logits).
    logits = gpt()(input_ids=IDS, cond=torch.tensor([3, 5])).logits  # label 5 = null class
    assert logits.shape == (2, 16, 24) and logits.dtype == torch.float64
    assert logits.sum().item() == pytest.approx(1.1209440832301625, abs=1e-9)
    assert logits.abs().sum().item() == pytest.approx(388.9272566604898, abs=1e-9)
    torch.testing.assert_close(logits[0, -1, :4], torch.tensor(
        [-0.013397067358538592, -0.21485085406857568, 0.5340920343489999, -0.8553409238000871], dtype=torch.float64),
        atol=1e-10, rtol=0)
    torch.testing.assert_close(logits[1, 5, :4], torch.tensor(
        [-1.0196643868886597, 0.9749949166632735, -0.5029857834325909, -0.23699730607474892], dtype=torch.float64),
        atol=1e-10, rtol=0)
    assert logits[0].argmax(-1).tolist() == [14, 9, 16, 16, 0, 13, 13, 20, 3, 17, 17, 1, 7, 12, 21, 4]
    # float32 model: float32 logits (LlamaGen's .float()), same numbers to fp32 accuracy
    l32 = gpt(dtype=torch.float32)(input_ids=IDS, cond=torch.tensor([3, 5])).logits
    assert l32.dtype == torch.float32
    torch.testing.assert_close(l32.double(), logits, atol=1e-4, rtol=0)


def test_t2i_logits_regression():
    # Matched against LlamaGen's Transformer(model_type="t2i", cls_token_num=3) as in the c2i test:
    # 0.0 max |diff| (fp32, and fp64 with the fp32 casts shimmed).
    logits = gpt(T2I)(input_ids=IDS[:, :6], cond=CAP).logits
    assert logits.shape == (2, 9, 24)
    assert logits.sum().item() == pytest.approx(-0.4789472411437421, abs=1e-9)
    assert logits.abs().sum().item() == pytest.approx(164.6146041033145, abs=1e-9)
    torch.testing.assert_close(logits[0, -1, :4], torch.tensor(
        [-0.351719426129505, 0.08977121971259641, 0.23605519064931302, -0.6082865073550295], dtype=torch.float64),
        atol=1e-10, rtol=0)
    torch.testing.assert_close(logits[1, 5, :4], torch.tensor(
        [-0.1318378520124792, -0.08941831609333555, 0.5018408852888169, -0.7705470733972312], dtype=torch.float64),
        atol=1e-10, rtol=0)
    assert logits[0].argmax(-1).tolist() == [14, 14, 5, 9, 16, 16, 0, 6, 13]


@pytest.mark.parametrize("cfg", [C2I, T2I], ids=["c2i-gqa", "t2i"])
def test_cache_prefill_and_decode_equal_full_forward(cfg):
    model = gpt(cfg)
    cond = torch.tensor([3, 5]) if cfg["model_type"] == "c2i" else CAP
    T = model.cls_token_num
    ids = IDS[:, :9]
    full = model(input_ids=ids, cond=cond, use_cache=False)
    assert full.past_key_values is None
    # prefill condition + 2 image tokens, then blocks of 1, 3, 1 ... tokens
    out = model(input_ids=ids[:, :2], cond=cond)
    cache = out.past_key_values
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == T + 2
    logits = [out.logits]
    for a, b in [(2, 3), (3, 6), (6, 7), (7, 9)]:
        out = model(input_ids=ids[:, a:b], past_key_values=cache)
        assert out.past_key_values is cache
        logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), full.logits, atol=1e-12, rtol=0)
    # the cache holds n_kv_head (un-repeated) heads
    assert cache.layers[0].keys.shape == (2, model.config.kv_heads, T + 9, model.config.head_dim)
    # prefill with only the condition and an empty image-token tensor
    out = model(input_ids=ids[:, :0], cond=cond, logits_to_keep=1)
    torch.testing.assert_close(out.logits[:, 0], full.logits[:, T - 1], atol=1e-12, rtol=0)


def test_attention_mask_holes_and_crop():
    """A masked middle slot (a rejected draft) is invisible when position_ids skip it; crop(-n) rolls back."""
    model = gpt()
    cond = torch.tensor([1, 4])
    ref = model(input_ids=IDS[:, :6], cond=cond, use_cache=False).logits  # positions 0..6
    # full forward with a junk token inserted after image token 1 (cache slot 3), masked out
    junk = torch.full((2, 1), 7)
    ids = torch.cat([IDS[:, :2], junk, IDS[:, 2:6]], 1)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[:, 3] = 0
    pos = torch.tensor([0, 1, 2, 2, 3, 4, 5, 6]).expand(2, 8)  # the hole's own position is irrelevant
    out = model(input_ids=ids, cond=cond, attention_mask=mask, position_ids=pos, use_cache=False).logits
    keep = [0, 1, 2, 4, 5, 6, 7]
    torch.testing.assert_close(out[:, keep], ref, atol=1e-12, rtol=0)
    # a different junk token changes nothing at the kept positions
    out2 = model(input_ids=torch.cat([IDS[:, :2], junk + 5, IDS[:, 2:6]], 1), cond=cond, attention_mask=mask,
                 position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(out2[:, keep], out[:, keep], atol=0, rtol=0)

    # the same through the cache, with per-row holes (row 0 rejects 2 drafts, row 1 none), then crop
    o = model(input_ids=IDS[:, :2], cond=cond)
    cache = o.past_key_values
    drafts = torch.stack([torch.tensor([9, 9]), IDS[1, 2:4]])  # row 1's drafts are the real tokens
    m = torch.ones(2, 5, dtype=torch.long)
    model(input_ids=drafts, past_key_values=cache, attention_mask=m)
    m[0, 3:] = 0  # row 0 rejects both drafts -> holes
    assert cache.get_seq_length() == 5
    step_pos = torch.tensor([[3], [5]])  # logical positions: row 0 continues at 3, row 1 at 5
    step_ids = torch.stack([IDS[0, 2:3], IDS[1, 4:5]])
    m = torch.cat([m, torch.ones(2, 1, dtype=torch.long)], 1)
    got = model(input_ids=step_ids, past_key_values=cache, attention_mask=m, position_ids=step_pos).logits[:, 0]
    torch.testing.assert_close(got[0], ref[0, 3], atol=1e-12, rtol=0)
    torch.testing.assert_close(got[1], ref[1, 5], atol=1e-12, rtol=0)
    # roll back the step and the two draft slots; continue as plain decoding
    cache.crop(-3)
    assert cache.get_seq_length() == 3
    got = model(input_ids=IDS[:, 2:4], past_key_values=cache).logits
    torch.testing.assert_close(got, ref[:, 3:5], atol=1e-12, rtol=0)


def test_left_padded_captions_and_4d_mask():
    """t2i padding (LlamaGen's emb_masks): padded caption slots are hidden from every other query."""
    model = gpt(T2I)
    emb = torch.tensor([[0, 1, 1], [1, 1, 1]])
    mask = torch.cat([emb, torch.ones(2, 4, dtype=torch.long)], 1)
    a = model(input_ids=IDS[:, :4], cond=CAP, attention_mask=mask, use_cache=False).logits
    cap2 = CAP.clone()
    cap2[0, 0] = 100.0  # change the padded caption token only
    b = model(input_ids=IDS[:, :4], cond=cap2, attention_mask=mask, use_cache=False).logits
    assert torch.isfinite(a).all()
    torch.testing.assert_close(b[0, 1:], a[0, 1:], atol=1e-12, rtol=0)
    torch.testing.assert_close(b[1], a[1], atol=1e-12, rtol=0)  # same shapes, but another row's values changed
    # a ready 4-D boolean mask is used as given
    four = lg.LlamaGenGPT.build_attention_mask(mask, torch.arange(7), 2, 7)
    assert four.shape == (2, 1, 7, 7) and four.dtype == torch.bool
    assert bool(four[0, 0, 0, 0]) and not bool(four[0, 0, 1, 0])  # own slot always visible
    c = model(input_ids=IDS[:, :4], cond=CAP, attention_mask=four, use_cache=False).logits
    torch.testing.assert_close(c, a, atol=0, rtol=0)


def test_condition_drop_and_null_condition():
    model = gpt()
    labels = torch.tensor([2, 3])
    dropped = model(cond=labels, cond_drop=torch.tensor([True, False]), use_cache=False).logits
    explicit = model(cond=torch.tensor([5, 3]), use_cache=False).logits
    torch.testing.assert_close(dropped, explicit, atol=0, rtol=0)
    assert model.null_condition(labels).tolist() == [5, 5]
    with pytest.raises(ValueError, match="class labels"):
        model(cond=torch.tensor([6]))

    t2i = gpt(T2I)
    null = t2i.null_condition(CAP)
    torch.testing.assert_close(null[1], t2i.cls_embedding.uncond_embedding[:3])
    a = t2i(cond=CAP, cond_drop=torch.tensor([0, 1]), use_cache=False).logits
    b = t2i(cond=torch.stack([CAP[0], null[1]]), use_cache=False).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    # captions longer than cls_token_num are cut to the first cls_token_num tokens (LlamaGen slices)
    longer = torch.cat([CAP, torch.randn(2, 5, 12, dtype=torch.float64)], 1)
    torch.testing.assert_close(t2i(cond=longer, use_cache=False).logits, t2i(cond=CAP, use_cache=False).logits)


def test_training_mode_and_accessors():
    model = lg.LlamaGenGPT(**{**C2I, "class_dropout_prob": 1.0, "drop_path_rate": 0.1}).double()
    det_fill(model)
    model.train()
    torch.manual_seed(0)
    out = model(input_ids=IDS[:, :4], cond=torch.tensor([1, 2]), labels=IDS[:, :5])  # every label dropped
    assert out.loss is not None and torch.isfinite(out.loss)
    model.eval()
    ref = model(input_ids=IDS[:, :4], cond=torch.tensor([5, 5]), use_cache=False)
    assert model.get_input_embeddings() is model.tok_embeddings
    assert model.get_output_embeddings() is model.output
    cfg = model.config
    assert (cfg.vocab_size, cfg.cls_token_num, cfg.block_size, cfg.model_type) == (24, 1, 16, "c2i")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads, cfg.is_encoder_decoder) == (2, 32, 2, False)
    assert model.freqs_cis.dtype == torch.float32  # stays fp32 whatever the model dtype
    # logits_to_keep, hidden states
    out = model(input_ids=IDS[:, :4], cond=torch.tensor([5, 5]), logits_to_keep=2, output_hidden_states=True)
    # The head runs on [2, 2, 32] instead of [2, 5, 32]: another matmul shape may round differently (2e-16 seen
    # on another CPU), so this is equal to float64 precision, not bit for bit.
    torch.testing.assert_close(out.logits, ref.logits[:, -2:], atol=1e-12, rtol=0)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, 5, 32)
    # fresh LlamaGen-style init zeroes the output head
    assert lg.LlamaGenGPT(**C2I).output.weight.abs().sum() == 0


# ------------------------------------------------------------------------------------------------------
# reference sampler
# ------------------------------------------------------------------------------------------------------


def _manual_greedy(model, cond, n, cfg_scale):
    """Greedy CFG decoding without cache or batching tricks: cond and null condition run separately."""
    null = model.null_condition(cond)
    ids = torch.zeros(cond.shape[0], 0, dtype=torch.long)
    for _ in range(n):
        c = model(input_ids=ids, cond=cond, use_cache=False).logits[:, -1]
        u = model(input_ids=ids, cond=null, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, (u + (c - u) * cfg_scale).argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("cfg", [C2I, T2I], ids=["c2i", "t2i"])
def test_generate_greedy_cfg_rows(cfg):
    model = gpt(cfg)
    cond = torch.tensor([0, 3]) if cfg["model_type"] == "c2i" else CAP
    toks = lg.llamagen_generate(model, cond, 16, cfg_scale=3.0, top_k=1)
    assert toks.shape == (2, 16) and toks.dtype == torch.long
    assert torch.equal(toks, _manual_greedy(model, cond, 16, 3.0))
    again = lg.llamagen_generate(model, cond, 16, cfg_scale=3.0, top_k=1, generator=torch.Generator().manual_seed(9))
    assert torch.equal(toks, again)  # greedy ignores the RNG
    plain = lg.llamagen_generate(model, cond, 6, cfg_scale=1.0, temperature=0.5, top_k=1)
    assert torch.equal(plain, _manual_greedy(model, cond, 6, 1.0))


def test_generate_sampling_reproducible_and_emb_masks():
    model = gpt(T2I)
    emb = torch.tensor([[0, 1, 1], [1, 1, 1]])
    cap = CAP * emb[:, :, None]
    kw = dict(cfg_scale=2.0, top_k=10, top_p=0.9, temperature=1.2, emb_masks=emb)
    a = lg.llamagen_generate(model, cap, 12, generator=torch.Generator().manual_seed(0), **kw)
    b = lg.llamagen_generate(model, cap, 12, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() < 24
    # greedy with emb_masks equals teacher-forced argmax with the same 2-D mask
    g = lg.llamagen_generate(model, cap, 8, cfg_scale=1.0, top_k=1, emb_masks=emb)
    mask = torch.cat([emb, torch.ones(2, 7, dtype=torch.long)], 1)
    logits = model(input_ids=g[:, :7], cond=cap, attention_mask=mask, use_cache=False).logits
    assert torch.equal(logits[:, 2:].argmax(-1), g)


def test_top_k_top_p_filtering():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 0.0]])
    k = lg.top_k_top_p_filtering(logits, top_k=2)
    assert torch.isinf(k[0]).tolist() == [True, False, False, True]
    assert torch.isinf(k[1]).tolist() == [False, False, False, False]  # ties at the k-th value are kept
    p = lg.top_k_top_p_filtering(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), top_p=0.7)
    assert torch.isinf(p[0]).tolist() == [False, False, True, True]  # the crossing token is kept
    assert torch.equal(logits, torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 0.0]]))  # not in place


# ------------------------------------------------------------------------------------------------------
# VQ tokenizer
# ------------------------------------------------------------------------------------------------------

IMG = torch.sin(torch.arange(2 * 3 * 8 * 8, dtype=torch.float64) * 0.37).view(2, 3, 8, 8)


def test_vq_regression_and_shapes():
    # Matched against LlamaGen's VQModel (tokenizer/tokenizer_image/vq_model.py, Encoder/Decoder with ch=32)
    # with the same det_fill weights: identical indices, max |diff| 0.0 for quant and decoded images.
    model = vq()
    quant, idx = model.encode(IMG)
    assert quant.shape == (2, 4, 4, 4) and idx.shape == (2, 16) and idx.dtype == torch.long
    assert idx.tolist() == [[15, 15, 15, 1, 10, 14, 5, 7, 9, 9, 11, 13, 14, 5, 5, 5],
                            [15, 15, 15, 1, 7, 7, 9, 9, 2, 4, 13, 15, 14, 5, 5, 5]]
    img = model.decode_code(idx, (2, 4, 4, 4))
    assert img.shape == (2, 3, 8, 8)
    assert img.sum().item() == pytest.approx(-138.21044228942728, abs=1e-9)
    assert img.abs().sum().item() == pytest.approx(479.87978748918187, abs=1e-9)
    torch.testing.assert_close(img[0, :, 0, 0], torch.tensor(
        [-1.4636113783828661, 0.5067885900979776, 2.292483071092997], dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(model.decode_code(idx.view(2, 4, 4)), img, atol=0, rtol=0)
    torch.testing.assert_close(model.decode_code(idx), img, atol=0, rtol=0)  # square grid inferred
    rec, _ = model(IMG)
    torch.testing.assert_close(rec, img, atol=1e-12, rtol=0)
    assert model.downsample_factor == 2


def test_vq_l2_normalised_codebook():
    model = vq()
    assert model.codebook is model.quantize.embedding.weight and model.codebook.shape == (16, 4)
    cb = model.normalized_codebook()
    torch.testing.assert_close(cb.norm(dim=-1), torch.ones(16, dtype=torch.float64))
    assert not torch.allclose(model.codebook.norm(dim=-1), torch.ones(16, dtype=torch.float64))
    quant, idx = model.encode(IMG)
    vecs = quant.permute(0, 2, 3, 1).reshape(2, 16, 4)
    torch.testing.assert_close(vecs.norm(dim=-1), torch.ones(2, 16, dtype=torch.float64))  # unit-norm codes
    torch.testing.assert_close(vecs, cb[idx], atol=1e-12, rtol=0)
    # the code is the best cosine match of the (unnormalised) latent
    z = model.quant_conv(model.encoder(IMG)).permute(0, 2, 3, 1).reshape(2, 16, 4)
    cos = torch.nn.functional.normalize(z, dim=-1) @ cb.t()
    assert torch.equal(cos.argmax(-1), idx)
    # without l2 norm the raw codebook is used
    raw = vq(codebook_l2_norm=False)
    q, i = raw.encode(IMG)
    torch.testing.assert_close(q.permute(0, 2, 3, 1).reshape(2, 16, 4), raw.codebook[i], atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------------
# loading / saving
# ------------------------------------------------------------------------------------------------------


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_gpt_load_formats(tmp_path):
    model = gpt(C2I, dtype=torch.float32)
    sd = model.state_dict()
    ns = argparse.Namespace(gpt_model="GPT-B", lr=1e-4)
    layouts = {
        "ddp.pt": {"model": sd, "optimizer": {"state": {}}, "steps": 10, "args": ns},  # LlamaGen training save
        "deepspeed.pt": {"module": sd},
        "sd.pt": {"state_dict": sd},
        "fsdp.pt": dict(sd),
        "compiled.pt": {"model": {"_orig_mod." + k: v for k, v in sd.items()}},
        "derived.pt": {"model": {**sd, "freqs_cis": torch.zeros(17, 4, 2)}},
    }
    # n_layer, dim, vocab_size, num_classes, model_type and n_kv_head (GQA) are read from the shapes
    inferred = ("n_layer", "dim", "vocab_size", "num_classes", "model_type", "n_kv_head")
    args = {k: v for k, v in C2I.items() if k not in inferred}
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / name)
        loaded = lg.load_gpt(tmp_path / name, **args)
        assert loaded.config == model.config
        assert not loaded.training
        _assert_same_weights(loaded, model)
        torch.testing.assert_close(loaded(input_ids=IDS[:, :3], cond=torch.tensor([1, 2])).logits,
                                   model(input_ids=IDS[:, :3], cond=torch.tensor([1, 2])).logits, atol=0, rtol=0)
    torch.save({"model": {}, "ema": sd}, tmp_path / "ema.pt")
    _assert_same_weights(lg.load_gpt(tmp_path / "ema.pt", use_ema=True, **args), model)

    # safetensors via save_gpt: the config travels in the metadata
    lg.save_gpt(model, tmp_path / "m.safetensors")
    loaded = lg.load_gpt(tmp_path / "m.safetensors", dtype=torch.float64)
    assert loaded.config == model.config and loaded.dtype == torch.float64
    torch.testing.assert_close(loaded(input_ids=IDS, cond=torch.tensor([3, 5])).logits,
                               gpt()(input_ids=IDS, cond=torch.tensor([3, 5])).logits, atol=1e-5, rtol=0)
    # save_gpt with a .pt suffix writes LlamaGen's {"model": state_dict}
    lg.save_gpt(model, tmp_path / "m.pt")
    assert set(torch.load(tmp_path / "m.pt", weights_only=True)) == {"model"}
    _assert_same_weights(lg.load_gpt(tmp_path / "m.pt", **args), model)

    # t2i round trip keeps the unconditional caption buffer
    t2i = gpt(T2I, dtype=torch.float32)
    lg.save_gpt(t2i, tmp_path / "t.safetensors")
    _assert_same_weights(lg.load_gpt(tmp_path / "t.safetensors"), t2i)


def test_gpt_load_strict_errors(tmp_path):
    sd = gpt(C2I, dtype=torch.float32).state_dict()
    args = dict(n_head=4, n_kv_head=2, block_size=16, multiple_of=16)
    bad = dict(sd)
    bad.pop("layers.1.ffn_norm.weight")
    bad["layers.0.attention.bias"] = torch.zeros(3)
    torch.save({"model": bad}, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as err:
        lg.load_gpt(tmp_path / "bad.pt", **args)
    msg = str(err.value)
    assert "missing keys (1): ['layers.1.ffn_norm.weight']" in msg
    assert "unexpected keys (1): ['layers.0.attention.bias']" in msg
    torch.save({"model": sd}, tmp_path / "ok.pt")
    with pytest.raises(ValueError, match="shape mismatches"):
        lg.load_gpt(tmp_path / "ok.pt", **{**args, "n_kv_head": 4})
    torch.save({"model": sd, "args": object()}, tmp_path / "unsafe.pt")
    with pytest.raises(RuntimeError, match="weights_only=False"):
        lg.load_gpt(tmp_path / "unsafe.pt", **args)
    torch.save({"weights": sd, "step": 1}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="no 'model'"):
        lg.load_gpt(tmp_path / "odd.pt", **args)


def test_vq_load_save(tmp_path):
    model = vq(dtype=torch.float32)
    sd = model.state_dict()
    torch.save({"model": sd, "args": argparse.Namespace(vq_model="VQ-16")}, tmp_path / "vq.pt")
    vq_args = dict(encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2], z_channels=8, ch=32)
    loaded = lg.load_vq(tmp_path / "vq.pt", **vq_args)  # codebook size/dim read from the checkpoint
    _assert_same_weights(loaded, model)
    assert loaded.config.codebook_size == 16 and loaded.config.codebook_show_usage
    # a checkpoint without the usage buffer loads into a model without it
    torch.save({k: v for k, v in sd.items() if k != "quantize.codebook_used"}, tmp_path / "bare.pt")
    assert not lg.load_vq(tmp_path / "bare.pt", **vq_args).config.codebook_show_usage
    lg.save_vq(model, tmp_path / "vq.safetensors")
    again = lg.load_vq(tmp_path / "vq.safetensors")
    assert again.config == model.config
    _assert_same_weights(again, model)
    with pytest.raises(ValueError, match="missing keys"):
        lg.load_vq(tmp_path / "vq.pt", **{**vq_args, "encoder_ch_mult": [1, 2, 2]})
