"""``compile=True``: the window forwards through ``torch.compile`` on the static cache.

Compiled == eager (greedy tokens, and the same random stream when sampling) with the real backend (inductor, on the
CPU here: marked slow, one compiled shape); tracing, recompile counts and the other methods with the ``aot_eager``
backend (traced by dynamo exactly as for inductor, without code generation, so seconds instead of minutes).
"""

import pytest
import torch

import mmspec
from mmspec.compile import BUCKETS, bucket

from lm_fixtures import perturbed_copy, ragged_prompts, tiny_causal_lm

torch_dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402


@pytest.fixture
def fresh_dynamo():
    torch_dynamo.reset()
    counters.clear()
    yield
    torch_dynamo.reset()


@pytest.fixture
def traced(monkeypatch, fresh_dynamo):
    monkeypatch.setenv("MMSPEC_COMPILE_BACKEND", "aot_eager")


def _frames() -> int:
    """Frames dynamo compiled so far: the first compilation of each shape plus every recompilation."""
    return counters["frames"]["total"]


@pytest.mark.slow
def test_compiled_equals_eager_inductor(fresh_dynamo):
    model = tiny_causal_lm("llama", sharpen=3.0)
    ids, mask = ragged_prompts(3, 96, seed=2)
    common = dict(attention_mask=mask, max_new_tokens=30, method="ar", eos_token_id=[])
    eager = mmspec.generate(model, ids, **common)
    compiled = mmspec.generate(model, ids, compile=True, **common)
    assert torch.equal(compiled.sequences, eager.sequences)
    sample = dict(do_sample=True, temperature=1.5, top_k=20)
    eager = mmspec.generate(model, ids, generator=torch.Generator().manual_seed(7), **sample, **common)
    compiled = mmspec.generate(model, ids, generator=torch.Generator().manual_seed(7), compile=True, **sample,
                               **common)
    assert torch.equal(compiled.sequences, eager.sequences)  # same logits, same draws
    assert _frames() == 1  # one window size (1), compiled once, reused by the second decode


@pytest.mark.parametrize("method,kw", [("jacobi", dict(window=8)), ("lookup", dict(window=5)),
                                       ("draft", dict(window=5)), ("jacobi", dict(window=8, tree=(2, 2)))],
                         ids=["jacobi", "lookup", "draft", "jacobi-tree"])
def test_traced_equals_eager(traced, method, kw):
    model = tiny_causal_lm("llama", sharpen=3.0)
    ids, mask = ragged_prompts(3, 96, seed=2)
    extra = dict(draft_model=perturbed_copy(model, 0.3)) if method == "draft" else {}
    ref = mmspec.generate(model, ids, attention_mask=mask, max_new_tokens=30, method="ar", eos_token_id=1)
    out = mmspec.generate(model, ids, attention_mask=mask, max_new_tokens=30, method=method, eos_token_id=1,
                          compile=True, **kw, **extra)
    assert torch.equal(out.sequences, ref.sequences)
    assert _frames() > 0 and not counters["graph_break"]  # really compiled, in one graph per shape


def test_recompiles_bounded(traced):
    """A 30-token Jacobi decode compiles once per window bucket it uses (window 8 and the shorter tail steps),
    never once per step; a second decode of new prompts of the same shape compiles nothing."""
    model = tiny_causal_lm("llama", sharpen=3.0)
    ids, mask = ragged_prompts(3, 96, seed=2)
    out = mmspec.generate(model, ids, attention_mask=mask, max_new_tokens=30, method="jacobi", window=8,
                          eos_token_id=[], compile=True)
    steps = out.stats.target_forwards - 1
    first = _frames()
    assert steps >= 10 and 1 <= first <= len([b for b in BUCKETS if b <= bucket(8)])
    ids2 = torch.randint(2, 96, ids.shape, generator=torch.Generator().manual_seed(1)).masked_fill(mask == 0, 0)
    mmspec.generate(model, ids2, attention_mask=mask, max_new_tokens=30, method="jacobi", window=8, eos_token_id=[],
                    compile=True)
    assert _frames() == first


def test_bucket():
    assert [bucket(n) for n in (1, 2, 3, 5, 8, 9, 64, 65, 129, 200)] == [1, 2, 4, 8, 8, 16, 64, 128, 256, 256]


def test_compile_unavailable_is_a_clear_error(monkeypatch):
    model = tiny_causal_lm("llama")
    monkeypatch.delattr(torch, "compile")
    with pytest.raises(RuntimeError, match="needs torch.compile"):
        mmspec.generate(model, torch.tensor([[3, 4, 5]]), max_new_tokens=2, compile=True)
    monkeypatch.undo()
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.raises(RuntimeError, match="not supported"):
        mmspec.generate(model, torch.tensor([[3, 4, 5]]), max_new_tokens=2, compile=True)


@pytest.mark.slow
def test_traced_image_pipeline_equals_eager(traced):
    """The guided image pipeline (cond and uncond rows, structural forcing) compiled: the same greedy tokens."""
    from image_fixtures import tiny_pipeline

    pipe = tiny_pipeline()
    prompts = ["a red square", "blue"]
    ref = pipe(prompts, do_sample=False, decoding="ar", guidance_scale=2.5, output_type="latent")
    out = pipe(prompts, do_sample=False, decoding="jacobi", window=6, guidance_scale=2.5, output_type="latent",
               compile=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.tokens, ref.tokens)
    assert _frames() > 0


@pytest.mark.slow
def test_cli_text_compile_flag(traced, capsys):
    from mmspec.cli import main

    assert main(["text", "def add(a, b):", "--max-new-tokens", "8", "--compare", "--decoding", "lookup", "--compile",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "identical to AR: True" in out
    assert _frames() > 0


@pytest.mark.slow
def test_bench_text_cache_variants(traced, tmp_path):
    import json

    from mmspec.bench.text import main as bench_text

    bench_text(["--tiny", "--batch", "1", "--cache-variants", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in json.loads((tmp_path / "text.json").read_text())["rows"]}
    for name in ("ar", "lookup", "draft"):
        for variant in ("static", "static+compile"):
            row = rows[f"mmspec {name} [{variant}]"]
            assert row["identical"] and row["vs_dynamic"] > 0
