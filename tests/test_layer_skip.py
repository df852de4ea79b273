"""Self-speculative drafting by layer skipping (``method="self"``): exact, and the target is never touched."""

import copy
import functools
import hashlib
import itertools
import warnings

import pytest
import torch
from scipy.stats import chisquare

import mmspec
from mmspec.drafting.layer_skip import calibrate_skip, decoder_layers, expected_speedup, layer_skip_model
from mmspec.models.causal_lm import CausalLM

from lm_fixtures import ragged_prompts, tiny_causal_lm

NEW = 24
LAYERS = 4


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = tiny_causal_lm(arch, layers=LAYERS, sharpen=4.0)
        return cache[arch]

    return get


def _reference(model, ids, mask, eos):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                          pad_token_id=0)


def _truncated(model, keep):
    """An independent reference: a deep copy with the skipped layers really deleted."""
    ref = copy.deepcopy(model)
    name, layers = decoder_layers(ref)
    parent = ref.get_submodule(name.rsplit(".", 1)[0])
    kept = torch.nn.ModuleList(layers[i] for i in keep)
    for new_idx, layer in enumerate(kept):
        for sub in layer.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = new_idx
    setattr(parent, name.rsplit(".", 1)[1], kept)
    ref.config.num_hidden_layers = len(keep)
    return ref


def _fingerprint(model) -> str:
    h = hashlib.sha256()
    for name, t in itertools.chain(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("skip", [[1, 2], [0], [3]])
def test_draft_view_equals_truncated_model(models, arch, skip):
    target = models(arch)
    keep = [i for i in range(LAYERS) if i not in skip]
    view, ref = layer_skip_model(target, skip), _truncated(target, keep)
    ids, mask = ragged_prompts(3, 96, seed=2)
    a, b = CausalLM(view), CausalLM(ref)
    assert torch.allclose(a.prefill(ids, mask), b.prefill(ids, mask))
    block = torch.randint(2, 96, (3, 4), generator=torch.Generator().manual_seed(0))
    valid = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    assert torch.allclose(a.forward(block, valid), b.forward(block, valid))
    assert len(a.cache.layers) == len(keep)
    # The view really skips layers: it differs from the full target.
    assert not torch.allclose(CausalLM(target).prefill(ids, mask), b.prefill(ids, mask))


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("with_eos", [False, True])
def test_greedy_equals_transformers(models, arch, batch, with_eos):
    target = models(arch)
    ids, mask = ragged_prompts(batch, 96, seed=batch)
    eos = int(_reference(target, ids, mask, None)[0, ids.shape[1] + NEW // 3]) if with_eos else None
    ref = _reference(target, ids, mask, eos)
    for kw in (dict(skip=[1, 2]), dict(skip=[3], window=8, adaptive=True), dict(skip=[2], window=9, tree=(3, 4)),
               dict()):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = mmspec.generate(target, ids, attention_mask=mask, max_new_tokens=NEW, method="self",
                                  eos_token_id=eos if with_eos else [], pad_token_id=0, **kw)
        assert torch.equal(out.sequences, ref), f"{arch} {kw}"
        # calibrated (kw == {}): it drafts, or says that no layer set pays on this machine and decodes plainly
        declined = any("does not pay" in str(w.message) for w in caught)
        assert (out.stats.draft_forwards > 0) != declined and out.lossless
        assert not declined or kw == {}
        assert (out.stats.tree_nodes > 0) == ("tree" in kw and out.stats.target_forwards > 1)  # (EOS may come first)


def test_target_weights_modules_and_cache_unchanged(models):
    target = models("llama")
    before = _fingerprint(target)
    config = target.config.to_dict()
    layers = decoder_layers(target)[1]
    ids, mask = ragged_prompts(4, 96, seed=7)
    mmspec.generate(target, ids, attention_mask=mask, max_new_tokens=NEW, method="self", skip=[1, 2])
    mmspec.generate(target, ids, attention_mask=mask, max_new_tokens=8, method="self", do_sample=True,
                    generator=torch.Generator().manual_seed(0), skip=[0, 3])
    assert _fingerprint(target) == before
    assert target.config.to_dict() == config
    assert decoder_layers(target)[1] is layers and len(layers) == LAYERS
    assert [m.self_attn.layer_idx for m in layers] == list(range(LAYERS))
    # A target cache next to a running draft view keeps its contents.
    lm = CausalLM(target)
    lm.prefill(ids, mask)
    snapshot = [(layer.keys.clone(), layer.values.clone()) for layer in lm.cache.layers]
    draft = CausalLM(layer_skip_model(target, [1]))
    draft.prefill(ids, mask)
    draft.forward(ids[:, :3], torch.ones(4, 3, dtype=torch.bool))
    assert all(torch.equal(k, layer.keys) and torch.equal(v, layer.values)
               for (k, v), layer in zip(snapshot, lm.cache.layers))
    assert len(lm.cache.layers) == LAYERS and lm.cache.get_seq_length() == ids.shape[1]


def test_calibration_deterministic_and_cached():
    target = tiny_causal_lm("llama", layers=LAYERS, sharpen=4.0, seed=3)
    ids, mask = ragged_prompts(3, 96, seed=1)
    runs = [calibrate_skip(target, ids, mask, greedy=False, seed=5, cache=False, costs="layers") for _ in range(2)]
    assert runs[0] == runs[1]
    assert 1 <= len(runs[0].skip) < LAYERS and 1 <= runs[0].num_drafts
    assert all(0.0 <= a <= 1.0 for a, _ in runs[0].scores.values())
    # every early exit (the first e layers kept) is among the scored sets
    assert all(tuple(range(e, LAYERS)) in runs[0].scores for e in range(1, LAYERS))
    # The chosen set is the best scored one under the cost model.
    assert runs[0].speedup == pytest.approx(max(s for _, s in runs[0].scores.values()))
    cached = calibrate_skip(target, ids, mask, greedy=True)
    assert calibrate_skip(target, ids[:1], mask[:1], greedy=True) is cached  # cached per model and settings


def test_calibration_measures_costs():
    """costs="measure" times the target's windows and each scored draft on this machine."""
    target = tiny_causal_lm("llama", layers=LAYERS, sharpen=4.0, seed=3)
    ids, mask = ragged_prompts(2, 96, seed=1)
    cal = calibrate_skip(target, ids, mask, cache=False, max_drafts=4)
    assert len(cal.window_cost) == 5 and cal.window_cost[0] == 1.0 and all(c > 0 for c in cal.window_cost)
    assert set(cal.draft_costs) == set(cal.scores) and all(c > 0 for c in cal.draft_costs.values())
    for skip, (alpha, speedup) in cal.scores.items():  # each score follows from its measured costs
        assert speedup == pytest.approx(expected_speedup(alpha, cal.draft_costs[skip], 4, cal.window_cost)[0])
    assert (cal.num_drafts == 0) == (cal.speedup <= 1.0)


def test_self_without_a_paying_layer_set_decodes_without_drafts(monkeypatch):
    """When no skip set pays under the measured costs, method='self' warns and decodes plainly (same tokens)."""
    import mmspec.drafting.layer_skip as ls

    # a draft forward as dear as the target's, and windows that cost their width: drafting cannot pay
    monkeypatch.setattr(ls, "_forward_seconds", lambda adapter, batch, width, device, repeats=5: float(width))
    target = tiny_causal_lm("llama", layers=LAYERS, sharpen=4.0, seed=3)
    ids, mask = ragged_prompts(2, 96, seed=1)
    cal = calibrate_skip(target, ids, mask, cache=False)
    assert cal.num_drafts == 0 and cal.speedup < 1.0
    with pytest.warns(UserWarning, match="does not pay"):
        out = mmspec.generate(target, ids, attention_mask=mask, max_new_tokens=6, method="self", window=4)
    ref = mmspec.generate(target, ids, attention_mask=mask, max_new_tokens=6, method="ar")
    assert torch.equal(out.sequences, ref.sequences) and out.stats.draft_forwards == 0


def test_bad_costs():
    target = tiny_causal_lm("llama", layers=LAYERS)
    ids, mask = ragged_prompts(1, 96)
    with pytest.raises(ValueError, match="'measure' or 'layers'"):
        calibrate_skip(target, ids, mask, costs="flops")


def test_expected_speedup():
    assert expected_speedup(1.0, 0.5, 4) == (5 / 3, 4)
    assert expected_speedup(0.0, 0.5, 4) == (1 / 1.5, 1)
    value, k = expected_speedup(0.8, 0.25, 8)
    assert value == pytest.approx(max((1 - 0.8 ** (j + 1)) / 0.2 / (1 + j * 0.25) for j in range(1, 9)))
    # a window of k + 1 tokens costing more than one forward (a CPU) moves the optimum to shorter drafts
    window_cost = [1 + 0.1 * j for j in range(9)]
    value, k2 = expected_speedup(0.8, 0.25, 8, window_cost)
    assert value == pytest.approx(max((1 - 0.8 ** (j + 1)) / 0.2 / (window_cost[j] + j * 0.25) for j in range(1, 9)))
    assert k2 <= k


@pytest.mark.parametrize("skip,message", [
    ([], "empty"),
    ([0, 1, 2, 3], "at least one layer"),
    ([4], "out of range"),
    ([-1], "out of range"),
    (["1"], "int layer indices"),
    (1.5, "list of layer indices"),
])
def test_bad_skip(models, skip, message):
    target = models("llama")
    ids, mask = ragged_prompts(1, 96)
    with pytest.raises(ValueError, match=message):
        mmspec.generate(target, ids, max_new_tokens=4, method="self", skip=skip)


def test_calibration_needs_two_layers():
    ids, _ = ragged_prompts(1, 96)
    with pytest.raises(ValueError, match="at least 2 decoder layers"):
        mmspec.generate(tiny_causal_lm("llama", layers=1), ids, max_new_tokens=4, method="self")


def test_skip_needs_method_self(models):
    ids, _ = ragged_prompts(1, 96)
    with pytest.raises(ValueError, match="only used with method='self'"):
        mmspec.generate(models("llama"), ids, max_new_tokens=4, method="jacobi", skip=[1])


def test_vlm_greedy_equals_generate():
    from vlm_fixtures import FAMILIES, family_batch

    build, _ = FAMILIES["llava"]
    model, processor = build(seed=0)
    inputs = dict(family_batch("llava", processor, 3, seed=3))
    ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    for kw in (dict(skip=[1]), dict(skip=[0], window=3), dict(skip=[1], window=7, tree=(2, 3)), dict()):
        out = mmspec.generate(model, ids, attention_mask=mask, max_new_tokens=12, method="self", **kw, **inputs)
        assert torch.equal(out.sequences, ref), kw


@pytest.fixture
def layer_costs(monkeypatch):
    """Calibrate on the deterministic layer-count model: with measured costs whether a set pays depends on this
    machine's timings (a loaded CI core can make every set lose), and these tests need the calibrated run to draft."""
    from mmspec.drafting import layer_skip

    monkeypatch.setattr(layer_skip, "calibrate_skip", functools.partial(calibrate_skip, costs="layers"))


def test_image_pipeline_self_equals_ar(layer_costs):
    from image_fixtures import tiny_pipeline

    pipe = tiny_pipeline(layers=LAYERS, eol=True)
    before = _fingerprint(pipe.model)
    prompts = ["a red circle", "blue square on green background", "green"]
    ref = pipe(prompts, do_sample=False, decoding="ar", guidance_scale=2.5, output_type="pt")
    for kw in (dict(skip=[1]), dict(skip=[0, 2], window=4), dict(skip=[2], window=8, tree=(2, 3)), dict()):
        out = pipe(prompts, do_sample=False, decoding="self", guidance_scale=2.5, output_type="pt", **kw)
        assert torch.equal(out.tokens, ref.tokens), kw
        assert out.stats.step_compression > 1.0 and out.lossless
    assert _fingerprint(pipe.model) == before
    with pytest.raises(ValueError, match="only used with method='self'"):
        pipe(prompts, decoding="jacobi", skip=[1], output_type="pt")


# --- sampling: the enumeration chi-square with 4 new tokens ------------------------------------------------

V, NEW_S, N, ALPHA = 5, 4, 20_000, 1e-3
PROMPT = torch.tensor([[3, 1, 3, 1, 4]])


def exact_distribution(model, prompt=PROMPT, vocab=V, new=NEW_S, temperature=1.0, top_k=None):
    """Probability of every continuation of ``new`` tokens (base-``vocab`` index), from full forwards (at
    ``temperature``, keeping the ``top_k`` largest logits)."""
    outcomes = torch.tensor(list(itertools.product(range(vocab), repeat=new)))
    seqs = torch.cat([prompt.expand(len(outcomes), -1), outcomes], dim=1)
    with torch.no_grad():
        logits = model(seqs).logits.double() / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    T = prompt.shape[1]
    probs = logits[:, T - 1 : T - 1 + new].softmax(-1)
    return probs.gather(-1, outcomes.unsqueeze(-1)).squeeze(-1).prod(-1)


def chi2_pvalue(samples, expected_probs, vocab=V):
    new = samples.shape[1]
    codes = (samples * vocab ** torch.arange(new - 1, -1, -1)).sum(-1)
    observed = torch.bincount(codes, minlength=vocab**new).double()
    expected = expected_probs * len(samples)
    assert float(observed[expected == 0].sum()) == 0, "sampled an outcome of probability zero"
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue


def sample_many(model, **kw):
    out = mmspec.generate(model, PROMPT.expand(N, -1), max_new_tokens=NEW_S, do_sample=True,
                          generator=torch.Generator().manual_seed(1234), eos_token_id=[], **kw)
    return out.sequences[:, PROMPT.shape[1]:], out.stats


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(skip=[1], window=5), dict(skip=[0, 2], window=3, adaptive=True),
                                dict(skip=[1], window=5, tree=(2, 3)), dict(skip=[2], window=6, tree=(3, 2),
                                                                          temperature=0.7, top_k=3)])
def test_sampling_is_lossless(kw):
    target = tiny_causal_lm("llama", vocab_size=V, hidden=16, layers=3, sharpen=3.0, seed=11)
    samples, stats = sample_many(target, method="self", **kw)
    assert stats.step_compression > 1.0  # drafts were really accepted
    if "tree" in kw:  # trees of depth >= 2 were really verified, and paths deeper than one accepted
        assert stats.tree_nodes_per_step > kw["tree"][1] and sum(stats.accepted_histogram[2:]) > 0
    p = chi2_pvalue(samples, exact_distribution(target, temperature=kw.get("temperature", 1.0), top_k=kw.get("top_k")))
    assert p > ALPHA, f"self {kw}: chi-square p = {p:.2e}"


def test_video_pipeline_self_equals_ar(layer_costs):
    from test_video_pipeline import PROMPTS, tiny_video_pipeline

    pipe = tiny_video_pipeline(layers=3, eol=True)
    ref = pipe(PROMPTS, do_sample=False, decoding="ar", guidance_scale=2.5, output_type="latent")
    out = pipe(PROMPTS, do_sample=False, decoding="self", guidance_scale=2.5, output_type="latent")
    assert torch.equal(out.tokens, ref.tokens) and out.stats.draft_forwards > 0


def test_calibration_scores_as_many_tokens_with_fewer_prompts(monkeypatch):
    """One calibration prompt is decoded max_prompts times longer: the agreement rests on as many tokens."""
    import mmspec.drafting.layer_skip as ls

    seen, rollout = [], ls._rollout
    monkeypatch.setattr(ls, "_rollout", lambda adapter, prompts, kw, n, greedy, gen: seen.append(
        (prompts[0].shape[0], n)) or rollout(adapter, prompts, kw, n, greedy, gen))
    target = tiny_causal_lm("llama", layers=LAYERS, sharpen=4.0, seed=3)
    ids, mask = ragged_prompts(3, 96, seed=1)
    calibrate_skip(target, ids[:1], mask[:1], new_tokens=6, max_prompts=4, cache=False, costs="layers")
    calibrate_skip(target, ids, mask, new_tokens=6, max_prompts=2, cache=False, costs="layers")
    assert seen == [(1, 24), (2, 6)]
