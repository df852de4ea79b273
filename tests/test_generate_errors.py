"""Bad input gets a clear exception naming the argument; stats count real forward calls."""

import pytest
import torch

import mmspec

from lm_fixtures import tiny_causal_lm


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("llama", vocab_size=64, dtype=torch.float32)


IDS = torch.tensor([[5, 6, 7]])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="beam"), "unknown `method`"),
        (dict(window=0), "`window`"),
        (dict(window=2.5), "`window`"),
        (dict(max_new_tokens=-1), "`max_new_tokens`"),
        (dict(method="draft"), "needs a `draft_model`"),
        (dict(acceptance="lantern-typo"), "unknown acceptance criterion"),
        (dict(acceptance="typical"), "needs sampling"),
        (dict(init="diagonal"), "unknown Jacobi `init`"),
        (dict(temperature=0.0, do_sample=True), "`temperature`"),
        (dict(top_k=-3, do_sample=True), "`top_k`"),
        (dict(top_p=1.5, do_sample=True), "`top_p`"),
        (dict(max_ngram=0, method="lookup"), "`max_ngram`"),
        (dict(lookup_match="first", method="lookup"), "`lookup_match` must be one of"),
        (dict(lookup_match="earliest", method="jacobi"), "`lookup_match` is only used with method='lookup'"),
    ],
)
def test_bad_arguments(model, kwargs, match):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        mmspec.generate(model, IDS, **kwargs)


def test_draft_vocab_mismatch(model):
    other = tiny_causal_lm("llama", vocab_size=65, dtype=torch.float32)
    with pytest.raises(ValueError, match="share the tokenizer"):
        mmspec.generate(model, IDS, max_new_tokens=4, method="draft", draft_model=other)


def test_draft_model_without_draft_method(model):
    with pytest.raises(ValueError, match="only used with method in \\['draft', 'jacobi-draft'\\]"):
        mmspec.generate(model, IDS, max_new_tokens=4, method="jacobi", draft_model=model)


def test_ids_outside_vocab(model):
    with pytest.raises(ValueError, match=r"`input_ids` must lie in \[0, 64\)"):
        mmspec.generate(model, torch.tensor([[5, 64]]), max_new_tokens=4)
    with pytest.raises(ValueError, match="input_ids"):
        mmspec.generate(model, torch.tensor([[0.5, 1.0]]), max_new_tokens=4)


def test_right_padding_and_mask_shape(model):
    with pytest.raises(ValueError, match="left padded"):
        mmspec.generate(model, IDS, attention_mask=torch.tensor([[1, 1, 0]]), max_new_tokens=4)
    with pytest.raises(ValueError, match="attention_mask"):
        mmspec.generate(model, IDS, attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=4)


def test_generator_list_length(model):
    with pytest.raises(ValueError, match="generator"):
        mmspec.generate(model, IDS, max_new_tokens=4, do_sample=True, generator=[torch.Generator()] * 2)


def test_encoder_decoder_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                             d_kv=8, decoder_start_token_id=0))
    with pytest.raises(TypeError, match="encoder-decoder"):
        mmspec.generate(t5, IDS % 32, max_new_tokens=4)


def test_linear_attention_layers_refused():
    """Sliding-window models are supported (tests/test_sliding_window.py); layers whose state a hole cannot undo
    are refused with a clear error."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    m = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2))
    m.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(TypeError, match="linear / chunked attention or recurrent state"):
        mmspec.generate(m, IDS, max_new_tokens=4)


def test_zero_new_tokens_returns_prompt(model):
    out = mmspec.generate(model, IDS, max_new_tokens=0)
    assert torch.equal(out.sequences, IDS) and out.stats.target_forwards == 0


class _Counter:
    def __init__(self, module):
        self.calls = 0
        module.register_forward_hook(self)

    def __call__(self, *args):
        self.calls += 1


@pytest.mark.parametrize("method", ["ar", "jacobi", "lookup", "draft"])
def test_forward_counts_are_real(method):
    target = tiny_causal_lm("llama", vocab_size=64, sharpen=4.0)
    draft = tiny_causal_lm("llama", vocab_size=64, seed=3, hidden=16, layers=1)
    t_count, d_count = _Counter(target), _Counter(draft)
    ids = torch.randint(2, 64, (3, 6), generator=torch.Generator().manual_seed(0))
    out = mmspec.generate(target, ids, max_new_tokens=15, method=method,
                          draft_model=draft if method == "draft" else None, eos_token_id=[])
    assert out.stats.target_forwards == t_count.calls
    assert out.stats.draft_forwards == d_count.calls
    assert out.stats.new_tokens == 3 * 15 == sum(out.stats.new_tokens_per_row)
    s = out.stats
    assert s.step_compression == pytest.approx(s.new_tokens / sum(s.row_forwards))
    if method == "ar":
        assert s.step_compression == 1.0 and s.target_forwards == 15


def test_finished_rows_padded_like_transformers():
    target = tiny_causal_lm("gpt2", vocab_size=64, sharpen=4.0)
    ids = torch.randint(2, 64, (3, 5), generator=torch.Generator().manual_seed(4))
    plain = target.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    eos = int(plain[1, 5 + 3])
    ref = target.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=63)
    out = mmspec.generate(target, ids, max_new_tokens=12, method="lookup", eos_token_id=eos, pad_token_id=63)
    assert torch.equal(out.sequences, ref)
