"""Prompt words a word-level tokenizer does not know are reported, not silently turned into <unk>."""

import warnings

import pytest
import torch

from mmspec.models.vocab import known_words, unknown_words

from image_fixtures import tiny_pipeline, tiny_tokenizer


def test_unknown_words_and_vocabulary():
    tok = tiny_tokenizer()
    assert unknown_words(tok, "a photo of a red cat") == ["photo", "of", "cat"]
    assert unknown_words(tok, "a red circle on a blue background") == []
    assert known_words(tok) == sorted(["a", "red", "blue", "green", "circle", "square", "on", "background"])


def test_image_pipeline_warns_with_the_unknown_words():
    pipe = tiny_pipeline()
    with pytest.warns(UserWarning, match=r"'photo', 'cat'.*The model knows: a background blue circle"):
        pipe(["a photo", "a red cat"], output_type="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe("a red circle on a blue background", output_type="pt")  # all known: no warning


def test_caption_pipeline_warns_with_the_unknown_words():
    from mmspec.zoo.models import load_caption_pipeline

    pipe = load_caption_pipeline(with_draft=False)
    image = torch.rand(3, 64, 64)
    with pytest.warns(UserWarning, match=r"'Describe', 'image\.'"):
        pipe([image], prompt="Describe the image.", max_new_tokens=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe([image], prompt="describe the image", max_new_tokens=2)
