"""The ``mmspec`` command: image and text generation on the bundled models, benchmark smoke runs, bad flags."""

import json

import pytest
import torch
from PIL import Image

from mmspec.cli import main

PROMPT = "a small red circle at the top left on a striped blue background"


@pytest.mark.slow
def test_image_writes_png_of_the_right_size(tmp_path, capsys):
    out = tmp_path / "red.png"
    assert main(["image", PROMPT, "-o", str(out), "--window", "16", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "target forwards" in printed and "step compression" in printed
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.size == (64, 64) and im.mode == "RGB"


@pytest.mark.slow
def test_image_compare_reports_speedup_and_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["image", PROMPT, "a large green square at the center on a plain white background", "-o", str(out),
                 "--decoding", "draft", "--window", "4", "--compare", "--guidance", "2"]) == 0
    printed = capsys.readouterr().out
    assert "wall-clock speedup vs AR" in printed
    with Image.open(out) as im:  # a grid of two 64x64 images with 2-pixel padding
        assert im.size == (2 * 64 + 3 * 2, 64 + 2 * 2)
    assert (tmp_path / "grid_0.png").is_file() and (tmp_path / "grid_1.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["image", PROMPT, "-o", "x.jpg"], "--output must end with .png"),
    (["image", PROMPT, "--window", "0"], "--window must be >= 1"),
    (["image", PROMPT, "--init", "diagonal"], "--init must be one of"),
    (["image", PROMPT, "--acceptance", "nope"], "--acceptance must be one of"),
    (["image", PROMPT, "--decoding", "beam"], "invalid choice"),
    (["image"], "the following arguments are required"),
    (["text", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["text", "x", "--temperature", "0"], "--temperature must be > 0"),
    (["frobnicate"], "unknown command"),
])
def test_bad_flags_fail_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_benchmark_is_refused(capsys):
    assert main(["bench", "nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("image", "text", "bench", "serve"):
        assert cmd in out


def test_text_greedy_draft_equals_ar(capsys):
    assert main(["text", "def add(a, b):", "import os", "--max-new-tokens", "12", "--compare",
                 "--decoding", "draft"]) == 0
    out = capsys.readouterr().out
    assert "identical to AR: True" in out and "target forwards" in out


def test_bench_text_tiny_writes_json_and_markdown(tmp_path):
    rows = main_bench(["text", "--tiny", "--batch", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "text.json").read_text())
    assert {r["method"] for r in data["rows"]} >= {"mmspec ar", "mmspec draft", "transformers assisted"}
    assert all(r["identical"] for r in data["rows"])
    assert "| method |" in (tmp_path / "text.md").read_text()
    assert rows == 0


@pytest.mark.slow
def test_bench_image_tiny_writes_json_and_markdown(tmp_path):
    assert main_bench(["image", "--tiny", "--out", str(tmp_path), "--threads", "1"]) == 0
    data = json.loads((tmp_path / "image.json").read_text())
    methods = [r["method"] for r in data["rows"]]
    assert methods[0] == "AR" and len(methods) == 2
    for r in data["rows"]:
        assert r["target_forwards"] > 0 and 0 <= r["adherence"] <= 100 and r["frechet"] >= 0
    assert "step compr." in (tmp_path / "image.md").read_text()


def main_bench(argv):
    torch.manual_seed(0)
    return main(["bench"] + argv)
