"""Models dispatched by accelerate (``device_map`` with offloaded weights) decode exactly like the plain model.

There is one CPU here, so instead of two GPUs the maps offload some modules to "disk" (weights on the ``meta``
device, loaded by accelerate's hooks at each forward), which exercises the same code paths as a sharded target:
no parameter tells where inputs go, hooks move activations between modules, and logits appear wherever the head
runs. Nothing in mmspec may assume ``next(model.parameters()).device`` or call ``.cuda()``.
"""

import copy

import pytest
import torch
from accelerate import dispatch_model

import mmspec
from mmspec.models.causal_lm import input_device

from image_fixtures import tiny_pipeline


def _llama(seed=0, layers=3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def _offload(model, tmp_path, name, disk=("model.embed_tokens", "model.layers.1", "lm_head")):
    names = ["model.embed_tokens"] + [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)] + [
        "model.norm", "model.rotary_emb", "lm_head"]
    device_map = {n: ("disk" if n in disk else "cpu") for n in names}
    return dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path / name))


@pytest.fixture(scope="module")
def prompts():
    ids = torch.randint(3, 96, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize("method,tree", [("ar", None), ("jacobi", None), ("lookup", None), ("draft", None),
                                         ("jacobi", (2, 2)), ("draft", (2, 2))])
def test_offloaded_target_and_draft_decode_identically(method, tree, prompts, tmp_path):
    ids, mask = prompts
    target, draft = _llama(0), _llama(1, layers=2)
    kw = dict(attention_mask=mask, max_new_tokens=10, method=method, eos_token_id=[])
    if tree is not None:
        kw.update(tree=tree, window=7)
    ref = mmspec.generate(target, ids, **kw, **({"draft_model": draft} if method == "draft" else {}))
    t = _offload(copy.deepcopy(target), tmp_path, "t")
    assert t.get_input_embeddings().weight.device.type == "meta" and input_device(t) == torch.device("cpu")
    extra = {"draft_model": _offload(copy.deepcopy(draft), tmp_path, "d", disk=("model.layers.0",))} if method == "draft" else {}
    out = mmspec.generate(t, ids, **kw, **extra)
    assert torch.equal(out.sequences, ref.sequences)
    assert out.stats.target_forwards == ref.stats.target_forwards


def test_sampled_decoding_with_offloaded_target_uses_the_same_random_stream(prompts, tmp_path):
    ids, mask = prompts
    target = _llama(2)
    kw = dict(attention_mask=mask, max_new_tokens=8, method="jacobi", do_sample=True, eos_token_id=[])
    ref = mmspec.generate(target, ids, generator=torch.Generator().manual_seed(5), **kw)
    out = mmspec.generate(_offload(copy.deepcopy(target), tmp_path, "s"), ids,
                          generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(out.sequences, ref.sequences)


def test_image_pipeline_with_an_offloaded_model(tmp_path):
    pipe = tiny_pipeline(dtype=torch.float32)
    kw = dict(prompt=["a red circle", "blue square"], guidance_scale=2.0, decoding="jacobi", window=4,
              do_sample=False, output_type="pt")
    ref = pipe(**kw)
    pipe.model = _offload(pipe.model, tmp_path, "img", disk=("model.embed_tokens", "model.layers.0"))
    out = pipe(**kw)
    assert torch.equal(out.tokens, ref.tokens)
