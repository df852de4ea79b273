"""mmspec uses the installed transformers' own names: no library deprecation warning is caused by mmspec.

transformers renamed ``past_key_values`` to ``cache`` (forward keyword and output field); using the old name
emits a ``FutureWarning`` from forward and logs a deprecation message once per process. These tests run every
method (and the bundled zoo pipelines) with warnings turned into errors and the transformers / diffusers
loggers captured, after clearing transformers' ``warning_once`` cache so an earlier test cannot hide a message.
"""

import logging
import warnings
from contextlib import contextmanager

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

import mmspec
from mmspec.models.compat import cache_keyword, make_output, output_cache

from lm_fixtures import tiny_causal_lm


@contextmanager
def no_library_warnings():
    """Fail on any FutureWarning / DeprecationWarning, and on any 'deprecat' message logged by transformers or
    diffusers, raised inside the block."""
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger("transformers"), logging.getLogger("diffusers")]
    logging.Logger.warning_once.cache_clear()  # transformers' once-per-process messages
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            yield
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    deprecated = [r.getMessage() for r in records if "deprecat" in r.getMessage().lower()]
    assert not deprecated, f"library deprecation messages logged: {deprecated}"


def test_compat_helpers_follow_the_installed_names():
    model = tiny_causal_lm()
    keyword = cache_keyword(model)
    assert keyword in ("cache", "past_key_values")
    import inspect

    assert keyword in inspect.signature(type(model).forward).parameters
    out = make_output(CausalLMOutputWithPast, logits=torch.zeros(1), past_key_values="the cache")
    assert output_cache(out) == "the cache"


@pytest.mark.parametrize("method", ["ar", "jacobi", "draft", "lookup"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_generate_emits_no_deprecation_warning(method, do_sample):
    target = tiny_causal_lm(arch="llama")
    draft = tiny_causal_lm(arch="llama", seed=1, layers=1) if method == "draft" else None
    ids = torch.randint(2, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: the masked attention path too
    with no_library_warnings():
        out = mmspec.generate(target, ids, attention_mask=mask, max_new_tokens=6, method=method, draft_model=draft,
                              do_sample=do_sample, generator=torch.Generator().manual_seed(1))
    assert out.sequences.shape == (2, 11)


def test_a_deprecated_call_is_caught():
    """The check itself can fail: passing the old keyword on purpose is reported."""
    model = tiny_causal_lm()
    if cache_keyword(model) != "cache":
        pytest.skip("the installed transformers has no renamed cache keyword")
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises((FutureWarning, AssertionError)):
        with no_library_warnings():
            model(input_ids=ids, past_key_values=None, use_cache=True)


def test_zoo_pipelines_emit_no_deprecation_warning():
    from mmspec.zoo.models import load_caption_pipeline, load_image_pipeline

    with no_library_warnings():
        pipe, draft = load_image_pipeline()
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a small red circle", output_type="pt", generator=torch.Generator().manual_seed(0),
                   decoding="draft", draft_model=draft)
        assert out.images.shape[0] == 1
        cap = load_caption_pipeline()
        image = torch.rand(3, 64, 64)
        text = cap([image], max_new_tokens=4)
        assert text is not None
