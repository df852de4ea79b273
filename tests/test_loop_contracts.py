"""The contracts around the one decoding loop: the continuous criterion in the registry, the target-adapter
Protocol, the registry of decoding methods (one list for generate, the pipelines and the CLI; a new method works
everywhere once registered), one input validator, the ``method``/``decoding`` alias, and unknown keyword
arguments refused by ``mmspec.generate``."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mmspec
from mmspec import acceptance
from mmspec.continuous import ContinuousState, decode_continuous
from mmspec.decoding import DecodeState, decode
from mmspec.drafting import NoDraft, Proposer, available_methods, make_proposer, register_method
from mmspec.drafting.base import _METHODS
from mmspec.models import CausalLM, GuidedLM, ImageFamily, TargetAdapter, register_family
from mmspec.models.mar import ContinuousARModel, DDPMTrajectory, MARRunner


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval().double()


def tiny_mar():
    torch.manual_seed(0)
    return ContinuousARModel(token_dim=2, grid_size=2, num_classes=3, hidden_size=8, num_layers=1, num_heads=1,
                             head_width=8, head_depth=1).eval()


IDS = torch.tensor([[3, 4, 5, 6]])


def test_continuous_criterion_is_registered_and_kind_checked(lm):
    assert "continuous" in acceptance.available()
    assert acceptance.available("continuous") == ["continuous"]
    assert "continuous" not in acceptance.available("tokens")
    crit = acceptance.get("continuous", max_tries=8)
    assert crit.lossless and crit.kind == "continuous" and crit.max_tries == 8
    with pytest.raises(ValueError, match="verifies continuous tokens.*'exact'"):
        acceptance.get("continuous", kind="tokens")
    with pytest.raises(ValueError, match="verifies token ids.*'continuous'"):
        acceptance.get("lantern", kind="continuous")
    with pytest.raises(ValueError, match="acceptance='continuous'"):
        mmspec.generate(lm, IDS, max_new_tokens=2, acceptance="continuous", do_sample=True)


def test_adapters_satisfy_the_protocol(lm):
    from mmspec.models.image_tokens import ImageLayout

    assert isinstance(CausalLM(lm), TargetAdapter)
    layout = ImageLayout(height=2, width=2, image_token_offset=8, codebook_size=16)
    assert isinstance(GuidedLM(lm, layout), TargetAdapter)
    runner = MARRunner(tiny_mar())
    assert isinstance(runner, TargetAdapter) and runner.vocab_size is None
    assert not isinstance(object(), TargetAdapter)
    assert callable(register_family) and issubclass(ImageFamily, object)


def test_one_list_of_methods():
    from mmspec.generation import DEFAULT_WINDOW, METHODS
    from mmspec.pipelines.continuous import DECODINGS as CONTINUOUS
    from mmspec.pipelines.image import DECODINGS as IMAGE

    assert list(METHODS) == list(IMAGE) == available_methods() == ["jacobi", "draft", "jacobi-draft", "lookup", "self",
                                                                   "lookahead", "ar"]
    assert list(CONTINUOUS) == available_methods("continuous") == ["ar", "draft"]
    assert DEFAULT_WINDOW == {"jacobi": 16, "draft": 6, "jacobi-draft": 24, "lookup": 11, "self": 6, "lookahead": 8, "ar": 1}
    proposer, window = make_proposer("ar", 9, init="random")  # options other methods use are ignored
    assert isinstance(proposer, NoDraft) and window == 1
    proposer, window = make_proposer("lookup", None, max_ngram=2, init="random")
    assert window == 11 and proposer.num_drafts == 10 and proposer.max_ngram == 2
    with pytest.raises(ValueError, match="unknown `method` 'beam'; choose one of"):
        make_proposer("beam")


class _RepeatLast(Proposer):
    """Drafts the last committed token K times (deterministic drafts)."""

    def __init__(self, num_drafts):
        self.num_drafts, self.calls = num_drafts, 0

    def propose(self, state, max_tokens):
        self.calls += 1
        K = min(self.num_drafts, max_tokens)
        return state.last_tokens(1).expand(-1, K).to(state.device), None


@pytest.fixture
def repeat_last_method():
    made = []

    @register_method("repeat-last", default_window=3)
    def _factory(window):
        made.append(_RepeatLast(window - 1))
        return made[-1]

    yield made
    del _METHODS[("repeat-last", "tokens")]


def test_a_registered_method_works_in_generate_and_the_image_pipeline(lm, repeat_last_method):
    from image_fixtures import tiny_pipeline

    ar = mmspec.generate(lm, IDS, max_new_tokens=6, method="ar", eos_token_id=[])
    out = mmspec.generate(lm, IDS, max_new_tokens=6, method="repeat-last", eos_token_id=[])
    assert torch.equal(out.sequences, ar.sequences) and repeat_last_method[-1].calls > 0
    assert len(out.stats.accepted_histogram) == 3  # the method's default window
    pipe = tiny_pipeline()
    a = pipe("a red circle", do_sample=False, method="ar", output_type="latent").tokens
    b = pipe("a red circle", do_sample=False, method="repeat-last", output_type="latent").tokens
    assert torch.equal(a, b) and repeat_last_method[-1].calls > 0


def test_method_and_its_decoding_alias():
    from image_fixtures import tiny_pipeline

    pipe = tiny_pipeline()
    kw = dict(do_sample=False, window=4, output_type="latent")  # random Jacobi init: the same generator seed
    a = pipe("a red circle", method="jacobi", generator=torch.Generator().manual_seed(0), **kw)
    b = pipe("a red circle", decoding="jacobi", generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a.tokens, b.tokens) and a.stats.target_forwards == b.stats.target_forwards
    with pytest.raises(ValueError, match="pass the decoding method once"):
        pipe("a red circle", method="ar", decoding="jacobi")
    with pytest.raises(ValueError, match="unknown `method` 'beam'"):
        pipe("a red circle", method="beam")


def test_generate_refuses_unknown_keyword_arguments(lm):
    for name, value in (("temprature", 0.1), ("num_beams", 4), ("top_n", 3)):
        with pytest.raises(ValueError, match=f"'{name}'"):
            mmspec.generate(lm, IDS, max_new_tokens=2, **{name: value})
    # arguments the model's forward takes pass (None values are dropped, as in transformers)
    out = mmspec.generate(lm, IDS, max_new_tokens=2, method="ar", inputs_embeds=None)
    assert out.sequences.shape == (1, 6)


def test_one_validator_for_generators(lm):
    gens = [torch.Generator()] * 3
    with pytest.raises(ValueError, match="3 generators for a batch of 1 rows"):
        mmspec.generate(lm, IDS, max_new_tokens=2, do_sample=True, generator=gens)


def test_continuous_tokens_run_through_decode_with_one_callback_signature():
    model = tiny_mar()
    traj = DDPMTrajectory(model.scheduler(), 3)
    seen = []
    tokens, stats, info = decode_continuous(MARRunner(model, 2.0), torch.tensor([0, 2]), trajectory=traj,
                                            draft=MARRunner(model, 2.0), window=3, generator=torch.Generator(),
                                            callback=lambda step, state: seen.append((step, state.num_new.tolist())))
    assert seen[0] == (0, [1, 1]) and seen[-1][1] == [4, 4] and tokens.shape == (2, 4, 2)
    assert info["acceptance_rate"] == 1.0  # draft == target accepts everything
    # the same decode, called directly: a ContinuousState and plain AR
    state = ContinuousState(torch.tensor([1]), 4, 2, traj, torch.Generator().manual_seed(0), "cpu")
    state, stats = decode(MARRunner(model), NoDraft(), state, window=1, criterion="continuous",
                          callback=lambda step, s: seen.append(isinstance(s, ContinuousState)))
    assert stats.target_forwards == 4 and stats.step_compression == 1.0 and seen[-1] is True
    with pytest.raises(ValueError, match="verifies token ids"):
        decode(MARRunner(model), NoDraft(), ContinuousState(torch.tensor([1]), 4, 2, traj, None, "cpu"), window=1,
               criterion="exact")
    ids_state = DecodeState(IDS, torch.ones_like(IDS), 2, 48, mmspec.LogitsPipeline(), None, torch.device("cpu"))
    with pytest.raises(ValueError, match="verifies continuous tokens"):
        decode(None, NoDraft(), ids_state, window=1, criterion="continuous")


def test_token_lists_follow_the_committed_tokens():
    """``DecodeState.token_lists`` (host-side proposers search it) equals each row's valid tokens after every append:
    left padding, EOS ends a row, the budget truncates, finished rows take nothing, built before or mid-decode."""
    from mmspec.sampling import LogitsPipeline

    ids = torch.tensor([[0, 0, 7, 8], [5, 6, 7, 8], [0, 9, 9, 9]])
    mask = (ids != 0).long()
    gen = torch.Generator().manual_seed(0)
    states = [DecodeState(ids, mask, 9, 32, LogitsPipeline(), None, torch.device("cpu"),
                          eos_token_ids=torch.tensor([31])) for _ in range(2)]
    states[0].token_lists()  # built at the start; the other one lazily, mid-way
    for step in range(8):
        emitted = torch.randint(1, 33, (3, 4), generator=gen)
        emitted[torch.rand(3, 4, generator=gen) < 0.3] = -1
        emitted[:, 1:][emitted[:, :-1] < 0] = -1  # -1 padded after each row's tokens
        counts = [s.append(emitted) for s in states]
        assert torch.equal(counts[0], counts[1])
        if step == 3:
            states[1].token_lists()
        for s in states:
            assert s.token_lists() == [row[ok].tolist() for row, ok in zip(s.tokens, s.valid)], step
    assert not states[0].active.all()  # some row finished (EOS or budget) on the way
