"""Logs and CI output get no progress bars: none from loading weights, pipeline bars on a terminal only."""

import torch

from mmspec.zoo.models import load_caption_pipeline, load_image_pipeline

from image_fixtures import tiny_pipeline


def test_loading_writes_no_bars(capfd):
    from transformers.utils import logging as t_logging

    load_image_pipeline()
    cap = load_caption_pipeline(with_draft=False)
    assert "Loading" not in capfd.readouterr().err
    assert t_logging.is_progress_bar_enabled()  # the libraries' own setting is restored afterwards

    cap([torch.rand(3, 64, 64)] * 2, max_new_tokens=3, batch_size=1)  # two batches: a bar on a terminal only
    assert "\r" not in capfd.readouterr().err
    cap([torch.rand(3, 64, 64)] * 2, max_new_tokens=3, batch_size=1, progress=True)  # asked for: shown
    assert "captions" in capfd.readouterr().err


def test_pipeline_bar_only_on_a_terminal_or_when_asked(capfd):
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config()  # the default (the fixture disables it)
    pipe("a red circle", output_type="pt")
    assert "\r" not in capfd.readouterr().err  # pytest's captured stderr is not a terminal
    pipe.set_progress_bar_config(disable=False)
    pipe("a red circle", output_type="pt")
    assert "it/s" in capfd.readouterr().err
