"""The ``mmspec`` command: image and text generation on the bundled models, benchmark smoke runs, bad flags."""

import json

import pytest
import torch
from PIL import Image

from mmspec.cli import main

PROMPT = "a small red circle at the top left on a vertically striped blue background"  # words the model knows


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
    assert "wall-clock speedup vs AR" in printed and "median of 3 interleaved runs" in printed
    assert "per-run ratios" in printed
    with Image.open(out) as im:  # a grid of two 64x64 images with 2-pixel padding
        assert im.size == (2 * 64 + 3 * 2, 64 + 2 * 2)
    assert (tmp_path / "grid_0.png").is_file() and (tmp_path / "grid_1.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["image", PROMPT, "-o", "x.jpg"], "--output must end with .png"),
    (["image", PROMPT, "--window", "0"], "--window must be >= 1"),
    (["image", PROMPT, "--init", "diagonal"], "argument --init: invalid choice: 'diagonal' (choose from"),
    (["image", PROMPT, "--acceptance", "nope"], "argument --acceptance: invalid choice: 'nope' (choose from"),
    (["image", PROMPT, "--compare", "--decoding", "ar"], "--compare runs plain AR beside"),
    (["image", PROMPT, "--repeats", "0"], "--repeats must be >= 1"),
    (["image", PROMPT, "--decoding", "beam"], "invalid choice"),
    (["image"], "the following arguments are required"),
    (["text", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["text", "x", "--temperature", "0"], "--temperature must be > 0"),
    (["frobnicate"], "unknown command"),
    (["image", PROMPT, "--skip-layers", "1"], "--skip-layers is only used with --method self"),
    (["text", "x", "--method", "draft", "--skip-layers", "0"], "--skip-layers is only used with --method self"),
])
def test_bad_flags_fail_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_values_fail_before_any_model_loads(monkeypatch, capsys):
    import mmspec.zoo.models as zoo

    monkeypatch.setattr(zoo, "load_image_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    for bad in (["--init", "diagonal"], ["--acceptance", "nope"]):
        with pytest.raises(SystemExit):
            main(["image", PROMPT, *bad])


def test_image_help_shows_defaults_choices_and_the_vocabulary(capsys):
    with pytest.raises(SystemExit) as err:
        main(["image", "--help"])
    assert err.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 16)" in out and "(default: vertical)" in out and "(default: exact)" in out
    for init in ("random", "horizontal", "vertical", "sample_horizon"):
        assert init in out
    assert "--device" in out and "--threads" in out and "oversubscribes" in out
    for word in ("vertically", "striped", "checkered", "ellipse"):  # the model's vocabulary
        assert word in out


def test_text_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["text", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 64)" in out and "(default: draft)" in out and "--device" in out


def test_version(capsys):
    import mmspec

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mmspec {mmspec.__version__}"


def test_serve_without_the_extra_says_what_to_install(monkeypatch, capsys):
    import sys

    for name in [m for m in sys.modules if m == "mmspec.serve" or m.startswith("mmspec.serve.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if fastapi were not installed
    assert main(["serve", "--help"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'mmspec[serve]'" in err and "Traceback" not in err


def test_image_warns_about_unknown_words(tmp_path, capsys):
    with pytest.warns(UserWarning, match=r"'photo', 'of', 'cat'.*The model knows: a and at background"):
        main(["image", "a photo of a cat", "-o", str(tmp_path / "x.png"), "--window", "32", "--threads", "1"])


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


def test_text_self_tree_with_given_layers_equals_ar(capsys):
    assert main(["text", "def add(a, b):", "--max-new-tokens", "12", "--compare", "--method", "self",
                 "--skip-layers", "3", "--window", "9", "--tree", "3", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "identical to AR: True" in out and "target forwards" in out


def test_bench_text_tiny_writes_json_and_markdown(tmp_path):
    rows = main_bench(["text", "--tiny", "--batch", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "text.json").read_text())
    assert {r["method"] for r in data["rows"]} >= {"mmspec ar", "mmspec draft", "transformers assisted"}
    assert all(r["identical"] for r in data["rows"])
    assert "| method |" in (tmp_path / "text.md").read_text()
    assert rows == 0
    by = {r["method"]: r for r in data["rows"]}
    raw, ar = by["raw forward loop"]["times"], by["mmspec ar"]["times"]
    assert by["mmspec ar"]["vs_raw"] == pytest.approx(sorted(a / b for a, b in zip(raw, ar))[len(ar) // 2])


def test_paired_ratio_pairs_rounds():
    from mmspec.bench.common import paired_ratio

    # round 2 ran on a slowed machine: both methods took 3x; per round the method is 2x faster than the base
    assert paired_ratio([1.0, 3.0, 1.0], [0.5, 1.5, 0.5]) == 2.0
    assert paired_ratio([1.0, 3.0, 1.2], [0.5, 0.5, 1.2]) == 2.0  # median of 2, 6, 1
    with pytest.raises(ValueError, match="as many repeats"):
        paired_ratio([1.0], [1.0, 2.0])


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
