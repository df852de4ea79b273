"""The sample scripts run end to end on locally built models."""

import importlib.util
import json
from pathlib import Path

import PIL.Image
import pytest
import torch

from image_fixtures import tiny_image_lm, tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "samples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_image_script(tmp_path):
    pipe = tiny_pipeline(dtype=torch.float32)
    pipe.save_pretrained(tmp_path / "pipe")
    tiny_image_lm(seed=4, dtype=torch.float32).save_pretrained(tmp_path / "draft")
    script = _load("generate_image")
    out = tmp_path / "out"
    record = script.main(["--model", str(tmp_path / "pipe"), "--prompt", "a red circle", "--prompt", "blue square",
                          "--num-images", "2", "--decoding", "draft", "--draft", str(tmp_path / "draft"),
                          "--acceptance", "lantern", "--acceptance-param", "k=3", "--acceptance-param", "delta=0.1",
                          "--window", "4", "--out", str(out), "--threads", "1"])
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "image_000.png", "image_001.png", "image_002.png",
                                                     "image_003.png", "stats.json"]
    assert PIL.Image.open(out / "image_000.png").size == (16, 16)
    saved = json.loads((out / "stats.json").read_text())
    assert saved["lossless"] is False and saved["stats"]["new_tokens"] == 4 * 17 == record["stats"]["new_tokens"]
    assert saved["args"]["coupled"] is True and saved["args"]["init"] == "vertical"  # the defaults of `mmspec image`
    assert saved["args"]["threads"] == 1
    with pytest.raises(SystemExit):
        script.main(["--model", str(tmp_path / "pipe"), "--out", str(out)])
    with pytest.raises(SystemExit):
        script.main(["--model", str(tmp_path / "pipe"), "--prompt", "x", "--acceptance-param", "novalue"])


def test_text_sample_script(monkeypatch, capsys):
    script = _load("compare_text")
    monkeypatch.setattr("sys.argv", ["compare_text.py", "--max-new-tokens", "6", "--repeats", "1", "--threads", "1"])
    script.main()
    out = capsys.readouterr().out
    assert "lookup" in out and "False" not in out
    assert "median of 1 interleaved runs" in out
