"""The decoding loop on the fused kernels: forced with ``kernels="triton"`` (Triton's CPU interpreter here),
``mmspec.generate`` and the image pipeline give greedy output equal to plain greedy decoding, and sampled
output equal to the torch path's with the same generator (the fused step draws the same noise in the same
order; only a last-bit near-tie could split them). On the CPU with ``kernels="auto"`` nothing changes: the
kernels are never called."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton: the kernels run on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402

import mmspec  # noqa: E402

from image_fixtures import tiny_pipeline  # noqa: E402
from lm_fixtures import tiny_causal_lm  # noqa: E402

triton_verify = pytest.importorskip("mmspec.kernels.triton_verify")

NEW = 10


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm(vocab_size=64, sharpen=4.0)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the fused kernel launches (one per verify step)."""
    calls = []
    real = triton_verify.run
    monkeypatch.setattr(triton_verify, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _prompts(model):
    return torch.randint(2, model.config.vocab_size, (2, 4), generator=torch.Generator().manual_seed(0))


def test_generate_greedy_on_kernels_equals_plain_greedy(model, kernel_calls):
    ids = _prompts(model)
    ref = model.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    for method in ("jacobi", "lookup"):
        out = mmspec.generate(model, ids, max_new_tokens=NEW, method=method, window=4, eos_token_id=[],
                              kernels="triton")
        assert torch.equal(out.sequences, ref), method
    assert len(kernel_calls) > 0


def test_generate_sampled_on_kernels_equals_torch_path(model, kernel_calls):
    ids = _prompts(model)
    kw = dict(max_new_tokens=NEW, method="jacobi", window=3, do_sample=True, temperature=0.9, eos_token_id=[])
    fused = mmspec.generate(model, ids, generator=torch.Generator().manual_seed(1), kernels="triton", **kw)
    calls = len(kernel_calls)
    plain = mmspec.generate(model, ids, generator=torch.Generator().manual_seed(1), kernels="torch", **kw)
    assert calls > 0 and len(kernel_calls) == calls  # the torch run never touched the kernels
    assert torch.equal(fused.sequences, plain.sequences)
    assert fused.stats.accepted_histogram == plain.stats.accepted_histogram


@pytest.mark.parametrize("do_sample", [False, True])
def test_token_trees_with_kernels_take_the_torch_path(model, kernel_calls, do_sample):
    """Token trees (here the draft model's and Jacobi's) decode with ``kernels="triton"`` as with the torch path:
    the chain steps (the prefill's first token) use the kernels, the tree steps the torch verification."""
    ids = _prompts(model)
    draft = tiny_causal_lm(vocab_size=64, sharpen=4.0, seed=3)
    for kw in (dict(method="draft", draft_model=draft, window=8, tree=(2, 3)), dict(method="jacobi", window=8,
                                                                                   tree=(2, 2))):
        kw.update(max_new_tokens=NEW, do_sample=do_sample, eos_token_id=[])
        runs = [mmspec.generate(model, ids, generator=torch.Generator().manual_seed(1), kernels=k, **kw)
                for k in ("triton", "torch")]
        assert torch.equal(runs[0].sequences, runs[1].sequences), kw["method"]
        assert runs[0].stats.tree_nodes > 0
    assert len(kernel_calls) > 0


@pytest.mark.parametrize("method", ["jacobi", "lookup"])
def test_rows_with_fewer_drafts_on_kernels_equal_torch_path(model, kernel_calls, method):
    """Rows propose fewer drafts than the window (-1 padded: own remaining budget, short lookup matches); with
    per-row generators the fused step draws what the torch path draws and takes each row's own bonus."""
    ids = torch.tensor([[5, 6, 5, 6, 5], [7, 8, 9, 10, 7]])
    kw = dict(max_new_tokens=NEW, method=method, window=5, do_sample=True, temperature=0.9, eos_token_id=[])
    runs = [mmspec.generate(model, ids, generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                            kernels=k, **kw) for k in ("triton", "torch")]
    assert len(kernel_calls) > 0
    assert torch.equal(runs[0].sequences, runs[1].sequences)


@pytest.mark.parametrize("do_sample", [False, True])
def test_rows_that_cannot_be_sampled_raise_on_kernels_too(kernel_calls, do_sample):
    from mmspec.verify import InvalidDistributionError

    broken = tiny_causal_lm(vocab_size=64, sharpen=4.0)
    with torch.no_grad():
        broken.get_output_embeddings().weight[5] = float("nan")  # token 5's logit is NaN everywhere
    ids = torch.tensor([[3, 4, 6, 7]])
    for kernels in ("triton", "torch"):
        with pytest.raises(InvalidDistributionError, match="no allowed token or is not finite"):
            mmspec.generate(broken, ids, max_new_tokens=4, method="jacobi", window=3, do_sample=do_sample,
                            generator=torch.Generator().manual_seed(0), eos_token_id=[], kernels=kernels)
    assert len(kernel_calls) > 0


def test_cpu_default_and_processors_keep_the_torch_path(model, kernel_calls, monkeypatch):
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    ids = _prompts(model)
    monkeypatch.delenv("MMSPEC_KERNELS", raising=False)
    mmspec.generate(model, ids, max_new_tokens=4, method="jacobi", window=3)  # auto on the CPU: torch
    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3)])
    out = mmspec.generate(model, ids, max_new_tokens=4, method="jacobi", window=3, logits_processor=procs,
                          kernels="triton")  # processors cannot be fused: the torch path runs
    ref = mmspec.generate(model, ids, max_new_tokens=4, method="ar", logits_processor=procs)
    assert kernel_calls == [] and torch.equal(out.sequences, ref.sequences)
    with pytest.raises(ValueError, match="backend"):
        mmspec.generate(model, ids, max_new_tokens=2, kernels="cuda")


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def test_image_pipeline_on_kernels(pipe, kernel_calls):
    """Guided greedy Jacobi on the kernels equals AR; sampled LANTERN equals the torch path's tokens."""
    prompts = ["a red circle", "green"]
    ar = pipe(prompts, do_sample=False, decoding="ar", guidance_scale=3.0, output_type="latent", kernels="torch")
    fused = pipe(prompts, do_sample=False, decoding="jacobi", window=5, guidance_scale=3.0, output_type="latent",
                 kernels="triton")
    assert torch.equal(fused.tokens, ar.tokens) and len(kernel_calls) > 0
    kw = dict(do_sample=True, decoding="jacobi", window=4, guidance_scale=2.0, output_type="latent",
              acceptance=mmspec.acceptance.Lantern(k=3, delta=0.3))
    greedy_calls = len(kernel_calls)
    a = pipe(prompts, generator=torch.Generator().manual_seed(2), kernels="triton", **kw)
    b = pipe(prompts, generator=torch.Generator().manual_seed(2), kernels="torch", **kw)
    assert len(kernel_calls) > greedy_calls and torch.equal(a.tokens, b.tokens)
