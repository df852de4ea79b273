"""Sliding-window models (Mistral, Gemma 2, Gemma 3, Qwen2 with ``use_sliding_window``) decode exactly.

Tiny configs with a window of 8 and sequences of 40+ tokens, so every row runs far past the window while rows
accept different numbers of drafts (holes). Greedy output must equal ``model.generate``; sampling follows the
target law (enumeration, chi-square at alpha = 0.001).
"""

import itertools

import pytest
import torch
from scipy.stats import chisquare

import mmspec

from lm_fixtures import perturbed_copy, ragged_prompts

WINDOW = 8


def sliding_lm(arch, vocab_size=96, hidden=32, seed=0, sharpen=3.0, dtype=torch.float64):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0,
                  eos_token_id=1, pad_token_id=0, sliding_window=WINDOW)
    if arch == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**common))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, use_sliding_window=True, max_window_layers=0))
    elif arch == "gemma2":
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, head_dim=8, attn_logit_softcapping=None))
    elif arch == "gemma3":
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**common, head_dim=8, sliding_window_pattern=2))
    else:
        raise ValueError(arch)
    if arch == "gemma2":
        # Gemma 2 defaults to eager attention (for its logit soft-capping), where left-padded rows come out NaN in
        # transformers 5.24 (fully masked padding queries) in the model's own generate too: compare on sdpa.
        model.config._attn_implementation = "sdpa"
    model = model.to(dtype).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(sharpen)
    return model


ARCHS = ["mistral", "qwen2", "gemma2", "gemma3"]


def test_configs_really_slide():
    for arch in ARCHS:
        kinds = set(getattr(sliding_lm(arch).config, "layer_types", None) or ["sliding_attention"])
        assert "sliding_attention" in kinds, arch


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,kw", [("ar", {}), ("jacobi", dict(window=6)), ("lookup", dict(window=5)),
                                       ("draft", dict(window=4)), ("jacobi", dict(window=8, tree=(2, 2)))],
                         ids=["ar", "jacobi", "lookup", "draft", "jacobi-tree"])
def test_greedy_equals_model_generate(arch, method, kw):
    model = sliding_lm(arch)
    ids, mask = ragged_prompts(4, 96, seed=1, min_len=3, max_len=12)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    extra = dict(draft_model=perturbed_copy(model, 0.3)) if method == "draft" else {}
    out = mmspec.generate(model, ids, attention_mask=mask, max_new_tokens=40, method=method, eos_token_id=[],
                          **kw, **extra)
    assert torch.equal(out.sequences, ref), f"{arch} {method}"
    if method != "ar":
        # rows accepted different numbers of drafts, so holes existed while the window slid
        assert len({tuple(h) for h in [out.stats.accepted_histogram]}) == 1 and sum(out.stats.accepted_histogram[1:]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_sampling_past_the_window_is_lossless(arch):
    """V = 4, a window of 2 tokens, 6 new tokens after a 3-token prompt: every sample outlives the window."""
    import transformers as tf

    V, NEW, N = 4, 6, 20_000
    torch.manual_seed(3)
    common = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, sliding_window=2, bos_token_id=0,
                  eos_token_id=1, pad_token_id=0)
    model = (tf.MistralForCausalLM(tf.MistralConfig(**common)) if arch == "mistral"
             else tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, head_dim=8))).double().eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(3.0)
    prompt = torch.tensor([[2, 3, 2]])
    outcomes = torch.tensor(list(itertools.product(range(V), repeat=NEW)))
    probs = torch.ones(len(outcomes), dtype=torch.float64)
    with torch.no_grad():  # the exact law, one growing prefix at a time, through transformers' own sliding cache
        for t in range(NEW):
            seqs = torch.cat([prompt.expand(len(outcomes), -1), outcomes[:, :t]], 1)
            p = model(seqs).logits[:, -1].double().softmax(-1)
            probs *= p.gather(1, outcomes[:, t:t + 1]).squeeze(1)
    for method, kw in [("jacobi", dict(window=4)), ("draft", dict(window=4, draft_model=perturbed_copy(model, 0.5)))]:
        out = mmspec.generate(model, prompt.expand(N, -1), max_new_tokens=NEW, method=method, do_sample=True,
                              generator=torch.Generator().manual_seed(7), eos_token_id=[], **kw)
        assert out.stats.step_compression > 1.0
        codes = (out.sequences[:, 3:] * V ** torch.arange(NEW - 1, -1, -1)).sum(-1)
        observed = torch.bincount(codes, minlength=V**NEW).double()
        expected = probs * N
        big = expected >= 5
        obs = torch.cat([observed[big], observed[~big].sum().view(1)])
        exp = torch.cat([expected[big], expected[~big].sum().view(1)])
        assert chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue > 1e-3, method


def test_linear_attention_is_refused():
    model = sliding_lm("qwen2")
    model.config.layer_types = ["linear_attention", "full_attention"]
    with pytest.raises(mmspec.models.causal_lm.RollbackError, match="linear_attention"):
        mmspec.generate(model, torch.tensor([[5, 6]]), max_new_tokens=3, method="jacobi")
