"""``mmspec bench gpu --dry-run`` (the device check's CPU path, so it cannot rot) and ``mmspec bench project``
(the cost model: projected speedups from step compression and a forward-time-vs-window curve)."""

import json

import pytest

from mmspec.bench.project import interpolate, pick_curve, project
from mmspec.bench.project import main as project_main
from mmspec.cli import main


@pytest.mark.slow
def test_gpu_dry_run_writes_every_section_and_a_cost_curve(tmp_path):
    assert main(["bench", "gpu", "--dry-run", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["dry_run"] and report["device"] == "cpu"
    s = report["sections"]
    assert set(s) == {"kernel_tests", "verify", "forward", "zoo"}
    assert not any("error" in sec for sec in s.values()), {k: v.get("error") for k, v in s.items()}
    assert s["kernel_tests"]["returncode"] == 0 and s["kernel_tests"]["counts"]  # collected, parsed
    assert s["verify"]["rows"] and s["verify"]["all_equal"]
    assert {r["dtype"] for r in s["verify"]["rows"]} == {"float16", "bfloat16", "float32"}
    curves = s["forward"]["curves"]
    assert {c["mode"] for c in curves} == {"eager", "compiled (eager)"}
    scaled = [c for c in curves if "scaled_to_layers" in c]
    assert scaled and set(scaled[0]["per_layer_ms"]) == set(scaled[0]["window_ms"]) == {"1", "4", "8"}
    assert "image" in s["zoo"] and "text" in s["zoo"], s["zoo"]
    image_rows = {r["method"]: r for r in s["zoo"]["image"]}
    assert image_rows["AR"]["batch"] == 1 and image_rows["AR"]["speedup_vs_ar"] == image_rows["AR"]["vs_eager_ar"] == 1
    assert image_rows["SJD (random init, w16)"]["step_compression"] > 1
    assert "# mmspec bench gpu" in (tmp_path / "gpu.md").read_text()
    cost = json.loads((tmp_path / "forward_cost.json").read_text())
    assert cost["kind"] == "forward_cost" and cost["dry_run"] and cost["curves"] == curves

    # the projection reads both files
    text = tmp_path / "text.json"
    text.write_text(json.dumps({"rows": s["zoo"]["text"]}))
    rows = project_main(["--steps", str(text), "--cost", str(tmp_path / "forward_cost.json"),
                 "--model", "tiny", "--mode", "eager", "--out", str(tmp_path)])
    by = {r["method"]: r for r in rows}
    assert by["mmspec ar"]["projected_speedup"] == pytest.approx(1.0)
    assert "PROJECTED" in (tmp_path / "project.md").read_text()


def test_gpu_zoo_parts_image_only(tmp_path):
    assert main(["bench", "gpu", "--dry-run", "--sections", "zoo", "--zoo-parts", "image", "--out", str(tmp_path)]) == 0
    zoo = json.loads((tmp_path / "gpu.json").read_text())["sections"]["zoo"]
    assert "image" in zoo and "text" not in zoo and "text_error" not in zoo, zoo


CURVE = {"model": "m", "batch": 1, "mode": "eager", "window_ms": {"1": 10.0, "4": 11.0, "16": 14.0}}


def test_projection_matches_a_hand_computed_example():
    rows = [
        {"method": "AR", "step_compression": 1.0, "target_forwards": 256},
        # window 16 (14 ms), 4 tokens per forward: 3.5 ms/token vs AR's 10 -> 2.857x
        {"method": "SJD coupled (vertical, w16)", "step_compression": 4.0, "target_forwards": 64},
        # window 10 (11 + 6/12 * 3 = 12.5 ms), 2.5 tokens per forward: 5 ms/token -> 2.0x
        {"method": "x", "window": 10, "step_compression": 2.5, "target_forwards": 100},
        # window 16 plus 5 draft forwards per step at 0.1 of t(1) = 5 ms: 19 / 4 = 4.75 ms/token -> 2.105x
        {"method": "d", "window": 16, "step_compression": 4.0, "target_forwards": 64, "draft_forwards": 320},
    ]
    out = {r["method"]: r for r in project(rows, CURVE, draft_cost=0.1)}
    assert out["AR"]["projected_speedup"] == pytest.approx(1.0)
    assert out["SJD coupled (vertical, w16)"]["projected_speedup"] == pytest.approx(10 / 3.5, abs=1e-3)
    assert out["x"]["projected_ms_per_token"] == pytest.approx(5.0)
    assert out["x"]["projected_speedup"] == pytest.approx(2.0)
    assert out["d"]["draft_fwd_per_step"] == pytest.approx(5.0)
    assert out["d"]["projected_speedup"] == pytest.approx(10 / 4.75, abs=1e-3)
    # a per-step overhead of 2 ms: AR 12 ms/token, SJD (14 + 2) / 4 = 4 ms/token -> 3.0x
    sjd = project(rows[1:2], CURVE, step_overhead_ms=2.0)[0]
    assert sjd["projected_speedup"] == pytest.approx(3.0)


def test_projection_refuses_to_extrapolate_and_names_unknown_windows():
    assert interpolate(CURVE["window_ms"], 16) == 14.0
    with pytest.raises(ValueError, match="outside the curve's measured windows 1-16"):
        interpolate(CURVE["window_ms"], 32)
    out = project([{"method": "mystery", "step_compression": 2.0, "target_forwards": 8},
                   {"method": "wide", "window": 32, "step_compression": 2.0, "target_forwards": 8}], CURVE)
    assert "projected_speedup" not in out[0] and "projected_speedup" not in out[1]
    assert "--window NAME=W" in out[0]["note"] and "outside" in out[1]["note"]
    assert project([{"method": "mystery", "step_compression": 2.0, "target_forwards": 8}], CURVE,
                   windows={"mystery": 4})[0]["projected_speedup"] == pytest.approx(10 / 5.5, abs=1e-3)
    with pytest.raises(ValueError, match=r"no curve with model='n'.*\('m', 1, 'eager'\)"):
        pick_curve({"curves": [CURVE]}, model="n")


def test_project_cli_rejects_a_bad_window_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "project", "--steps", "a.json", "--cost", "b.json", "--window", "draft=0"])
    assert "METHOD=W" in capsys.readouterr().err
