"""Data-parallel generation: sharding, resume, failure isolation, and two real gloo processes via torchrun."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmspec.distributed import DistContext, merge_records, read_prompt_file, run_sharded, shard_indices

from image_fixtures import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a blue square on a green background", "green", "a red square on a blue background",
           "blue circle", "a green circle on a red background", "square"]


def test_shard_indices_cover_everything_once():
    for n in (0, 1, 5, 8):
        for world in (1, 2, 3):
            shards = [shard_indices(n, r, world) for r in range(world)]
            assert sorted(i for s in shards for i in s) == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        shard_indices(4, 2, 2)


def test_read_prompt_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# header\n a red circle \n\nblue square\n")
    assert read_prompt_file(f) == ["a red circle", "blue square"]
    f.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompt_file(f)


def test_failures_are_isolated_recorded_and_retried(tmp_path):
    calls = []

    def process(indices, batch):
        calls.append(list(indices))
        if "boom" in batch:
            raise RuntimeError("model exploded")
        return [{"stats": {"new_tokens": len(x), "row_forwards": 1}} for x in batch]

    items = ["ab", "boom", "cde", "f"]
    summary = run_sharded(items, process, tmp_path, batch_size=4, progress=False)
    assert summary["ok"] == 3 and summary["missing"] == []
    assert summary["failed"] == [{"index": 1, "error": "RuntimeError: model exploded"}]
    assert summary["totals"]["new_tokens"] == 6 and summary["step_compression"] == 2.0
    assert calls == [[0, 1, 2, 3], [0], [1], [2], [3]]  # the batch failed, then one by one
    calls.clear()
    items[1] = "fixed"
    summary = run_sharded(items, process, tmp_path, batch_size=4, progress=False)
    assert calls == [[1]]  # finished items are skipped, the failed one is retried
    assert summary["ok"] == 4 and summary["failed"] == [] and summary["skipped_on_rank0"] == 3
    assert json.loads((tmp_path / "stats.json").read_text())["ok"] == 4


def test_single_process_context_by_default():
    ctx = DistContext()
    assert ctx.is_main and ctx.world_size == 1
    ctx.barrier()  # no process group: a no-op
    assert merge_records("/nonexistent", 2)["missing"] == [0, 1]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script_args(model_dir, prompt_file, out, *extra):
    return ["--model", str(model_dir), "--prompt-file", str(prompt_file), "--out", str(out), "--decoding", "jacobi",
            "--window", "4", "--guidance", "2", "--batch-size", "3", *extra]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_and_resume(tmp_path):
    pipe = tiny_pipeline(dtype=torch.float32)
    pipe.save_pretrained(tmp_path / "pipe")
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")

    # one process, in this interpreter
    sys.path.insert(0, str(ROOT / "samples"))
    try:
        import generate_image
    finally:
        sys.path.pop(0)
    single = generate_image.main(_script_args(tmp_path / "pipe", prompt_file, tmp_path / "one"))
    assert single["ok"] == len(PROMPTS) and single["world_size"] == 1

    # two processes with the gloo backend, launched as a user would
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))

    def torchrun():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               str(ROOT / "samples" / "generate_image.py"),
               *_script_args(tmp_path / "pipe", prompt_file, tmp_path / "two")]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    run = torchrun()
    assert run.returncode == 0, run.stderr[-3000:]
    merged = json.loads((tmp_path / "two" / "stats.json").read_text())
    assert merged["ok"] == len(PROMPTS) and merged["world_size"] == 2 and merged["failed"] == []
    assert {r["rank"] for r in merged["records"]} == {0, 1}
    for a, b in zip(single["records"], merged["records"]):
        assert a["prompt"] == b["prompt"] and a["tokens"] == b["tokens"]  # same seeds -> same images
        assert (tmp_path / "one" / a["file"]).read_bytes() == (tmp_path / "two" / b["file"]).read_bytes()

    # rerun: every prompt is already done and is skipped
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "two").glob("image_*.png")}
    run = torchrun()
    assert run.returncode == 0, run.stderr[-3000:]
    again = json.loads((tmp_path / "two" / "stats.json").read_text())
    assert again["ok"] == len(PROMPTS) and again["skipped_on_rank0"] == len(shard_indices(len(PROMPTS), 0, 2))
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "two").glob("image_*.png")}


def test_text_script_batches_resumes_and_matches_unbatched(tmp_path):
    sys.path.insert(0, str(ROOT / "samples"))
    try:
        import generate_text
    finally:
        sys.path.pop(0)
    prompts = tmp_path / "p.txt"
    prompts.write_text("def add(a, b):\nimport os\n# a comment line\nclass Point:\n    return self\n")
    args = ["--model", "zoo", "--prompt-file", str(prompts), "--max-new-tokens", "10", "--method", "draft"]
    batched = generate_text.main(args + ["--batch-size", "4", "--out", str(tmp_path / "b")])
    single = generate_text.main(args + ["--batch-size", "1", "--out", str(tmp_path / "s")])
    assert batched["ok"] == single["ok"] == 4
    for a, b in zip(batched["records"], single["records"]):
        assert a["tokens"] == b["tokens"] and len(a["tokens"]) == 10
        assert (tmp_path / "b" / a["file"]).read_text().startswith(a["prompt"])
    again = generate_text.main(args + ["--batch-size", "4", "--out", str(tmp_path / "b")])
    assert again["skipped_on_rank0"] == 4
