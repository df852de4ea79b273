"""``mmspec bench image --sweep`` pieces: bootstrap intervals, the sweep's points, the sanity rule, the plot."""

import math

import pytest
import torch

from mmspec.bench import image as bi


def test_bootstrap_mean_ci_brackets_the_mean_and_shrinks_with_n():
    g = torch.Generator().manual_seed(0)
    small = (torch.rand(32, generator=g) < 0.6).float()
    big = (torch.rand(1024, generator=g) < 0.6).float()
    lo_s, hi_s = bi.bootstrap_mean_ci(small, 500)
    lo_b, hi_b = bi.bootstrap_mean_ci(big, 500)
    assert lo_s <= float(small.mean()) <= hi_s and lo_b <= float(big.mean()) <= hi_b
    assert hi_b - lo_b < 0.5 * (hi_s - lo_s)
    assert bi.bootstrap_mean_ci(torch.ones(10), 100) == [1.0, 1.0]


def test_bootstrap_frechet_ci_is_ordered_and_separates_shifted_sets():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(200, 4, generator=g)
    same = torch.randn(200, 4, generator=g)
    shifted = same + 3.0
    lo, hi = bi.bootstrap_frechet_ci(same, real, 50)
    lo2, hi2 = bi.bootstrap_frechet_ci(shifted, real, 50)
    assert lo <= hi < lo2 <= hi2
    from mmspec.zoo import hub

    for f, (a, b) in ((same, (lo, hi)), (shifted, (lo2, hi2))):  # bias-corrected: brackets the estimate
        assert a <= hub.frechet_distance(f, real) <= b


def test_sweep_methods_cover_the_issue_grid():
    pts = bi.sweep_methods(torch.randn(64, 8))
    assert {"AR", "SJD (random init, w16)", "draft-verify exact"} <= set(pts)
    deltas = sorted(v["acceptance"][1]["delta"] for k, v in pts.items() if k.startswith("LANTERN delta"))
    lams = sorted(v["acceptance"][1]["lam"] for k, v in pts.items() if k.startswith("LANTERN++"))
    assert deltas[0] == 0.05 and deltas[-1] == 0.4 and lams[0] == 2 and lams[-1] == 20
    gsd = [v["acceptance"][1] for k, v in pts.items() if k.startswith("GSD")]
    assert len({p["group_size"] for p in gsd}) >= 3 and any(math.isinf(p["d_max"]) for p in gsd)
    assert any(not math.isinf(p["d_max"]) for p in gsd) and any(k.startswith("typical") for k in pts)
    tiny = bi.sweep_methods(torch.randn(64, 8), tiny=True)
    assert len(tiny) < len(pts) and "AR" in tiny


def test_sanity_rule_passes_equal_and_fails_broken_lossless_methods():
    g = torch.Generator().manual_seed(2)
    ar = (torch.rand(256, generator=g) < 0.7).float()
    same = (torch.rand(256, generator=g) < 0.7).float()
    broken = (torch.rand(256, generator=g) < 0.3).float()
    rows = [{"method": "AR", "lossless": True, "adherence": 100 * float(ar.mean()), "_per_image": ar},
            {"method": "ok", "lossless": True, "adherence": 100 * float(same.mean()), "_per_image": same},
            {"method": "broken", "lossless": True, "adherence": 100 * float(broken.mean()), "_per_image": broken},
            {"method": "lossy", "lossless": False, "adherence": 30.0, "_per_image": broken}]
    lines = bi.sanity(rows, 500)
    assert len(lines) == 2 and lines[0].startswith("PASS: ok") and lines[1].startswith("FAIL: broken")
    assert rows[1]["sanity_vs_ar"] == "pass" and rows[2]["sanity_vs_ar"] == "FAIL" and "sanity_vs_ar" not in rows[3]


def test_paired_delta_finds_a_small_cost_the_unpaired_interval_misses():
    # Captions of very different difficulty; the "relaxed" method fails 10% of the captions AR draws right.
    g = torch.Generator().manual_seed(3)
    hard = torch.rand(256, generator=g) < 0.5
    ar = (~hard).float()
    drop = torch.zeros(256, dtype=torch.bool)
    drop[torch.nonzero(~hard).flatten()[:13]] = True
    lossy = ar.masked_fill(drop, 0.0)
    rows = [{"method": "AR", "lossless": True, "adherence": 100 * float(ar.mean()), "_per_image": ar},
            {"method": "same", "lossless": True, "adherence": 100 * float(ar.mean()), "_per_image": ar.clone()},
            {"method": "lossy", "lossless": False, "adherence": 100 * float(lossy.mean()), "_per_image": lossy},
            {"method": "other n", "lossless": False, "adherence": 50.0, "_per_image": ar[:10]}]
    bi.paired_delta(rows, 500)
    assert "delta_vs_ar" not in rows[0] and "delta_vs_ar" not in rows[3]  # AR itself; not paired by caption
    assert rows[1]["delta_vs_ar"] == 0 and rows[1]["delta_vs_ar_ci"] == [0.0, 0.0] and "*" not in rows[1]["delta_text"]
    lo, hi = rows[2]["delta_vs_ar_ci"]
    assert rows[2]["delta_vs_ar"] == pytest.approx(-100 * 13 / 256) and lo <= rows[2]["delta_vs_ar"] <= hi < 0
    assert rows[2]["delta_text"].endswith("*")
    a_lo, a_hi = bi.bootstrap_mean_ci(ar, 500)
    assert a_lo <= float(lossy.mean()) <= a_hi  # unpaired, the cost hides inside AR's own interval
    assert rows[1]["p_holm"] == 1.0 and rows[2]["p_holm"] < 0.05 and rows[2]["p_holm"] >= rows[2]["p_vs_ar"]


def test_holm_adjusts_a_family_of_p_values():
    # sorted 0.01, 0.02, 0.04, 0.5 -> x4, x3, x2, x1 = 0.04, 0.06, 0.08, 0.5 (already non-decreasing)
    assert bi.holm([0.04, 0.5, 0.01, 0.02]) == pytest.approx([0.08, 0.5, 0.04, 0.06])
    assert bi.holm([0.03, 0.001]) == pytest.approx([0.03, 0.002])
    assert bi.holm([0.2, 0.9, 0.3]) == pytest.approx([0.6, 0.9, 0.6])  # monotone along the order, capped at 1
    assert bi.holm([]) == []
    # 20 true nulls at p = 0.04 each: unadjusted all "significant", adjusted none
    assert min(bi.holm([0.04] * 20)) == pytest.approx(0.8)


def test_sweep_plot_writes_png(tmp_path):
    rows = [{"method": "AR", "lossless": True, "step_compression": 1.0, "adherence": 50.0, "adherence_ci": [45, 55],
             "frechet": 10.0, "frechet_ci": [11.0, 14.0]},
            {"method": "LANTERN delta=0.1", "lossless": False, "step_compression": 2.0, "adherence": 45.0,
             "adherence_ci": [40, 50], "frechet": 12.0, "frechet_ci": [12.5, 15.0]}]
    path = bi.sweep_plot(rows, tmp_path / "d" / "sweep.png")
    assert path.is_file() and path.stat().st_size > 1000


@pytest.mark.slow
def test_bench_image_sweep_tiny_end_to_end(tmp_path, monkeypatch):
    import json

    rows = bi.main(["--sweep", "--tiny", "--bootstrap", "20", "--threads", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "image_sweep.json").read_text())
    assert len(data["rows"]) == len(rows) >= 5 and (tmp_path / "image_sweep.png").is_file()
    assert all(len(r["adherence_per_image"]) == 4 and len(r["adherence_ci"]) == 2 for r in data["rows"])
    assert "Sanity rule" in (tmp_path / "image_sweep.md").read_text()
    # A second run reuses every finished point (nothing is generated again) and gives the same table; --points
    # picks points by name (AR always comes along).
    def no_generation(*a, **k):
        raise AssertionError("a finished point was generated again")

    monkeypatch.setattr(bi, "run", no_generation)
    again = bi.main(["--sweep", "--tiny", "--bootstrap", "20", "--threads", "1", "--out", str(tmp_path)])
    assert [r["method"] for r in again] == [r["method"] for r in rows]
    assert [r["adherence"] for r in again] == [r["adherence"] for r in rows]
    assert f"reused from an earlier run: {len(rows)}" in (tmp_path / "image_sweep.md").read_text()
    # Other draft weights: only the points that decode with the draft are generated again (AR, SJD, GSD are kept).
    from mmspec.zoo import models as zoo_models

    load = zoo_models.load_image_pipeline

    def other_draft(*a, **k):
        pipe, draft = load(*a, **k)
        with torch.no_grad():
            next(draft.parameters()).add_(1e-3)
        return pipe, draft

    redone = []

    def record(pipe, draft, prompts, methods, *a, **k):
        redone.extend(methods)
        return [torch.load(tmp_path / "sweep_points" / f"{bi._slug(name)}.pt", weights_only=False)["row"]
                for name in methods]

    monkeypatch.setattr(zoo_models, "load_image_pipeline", other_draft)
    monkeypatch.setattr(bi, "run", record)
    bi.main(["--sweep", "--tiny", "--bootstrap", "20", "--threads", "1", "--out", str(tmp_path)])
    assert redone and sorted(redone) == sorted(r["method"] for r in rows if bi.uses_draft(bi.sweep_methods(
        torch.zeros(4, 2), tiny=True)[r["method"]]))
    assert not any(m.startswith(("AR", "SJD", "GSD")) for m in redone)
    monkeypatch.setattr(bi, "run", no_generation)  # (the draft points are now keyed by the other draft)
    some = bi.main(["--sweep", "--tiny", "--bootstrap", "20", "--points", "lantern", "--out", str(tmp_path)])
    assert [r["method"] for r in some] == ["AR"] + [r["method"] for r in rows if "LANTERN" in r["method"]]
    with pytest.raises(SystemExit, match="matches none"):
        bi.main(["--sweep", "--tiny", "--points", "nothing-like-this", "--out", str(tmp_path)])


def test_sweep_points_are_not_reused_on_other_weights():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    assert bi.weights_fingerprint(a) == bi.weights_fingerprint(a) != bi.weights_fingerprint(b)


def test_sweep_refuses_a_draft_that_does_not_fit_before_its_first_point(tmp_path, monkeypatch):
    """A draft whose image layout differs from the target's stops the sweep at once, not at its first draft point
    hours in (nothing is generated)."""
    from mmspec.zoo import models as zoo_models

    load = zoo_models.load_image_pipeline

    def misfit_draft(*a, **k):
        pipe, draft = load(*a, **k)
        draft.config.image_layout = {**draft.config.image_layout, "height": draft.config.image_layout["height"] // 2}
        return pipe, draft

    def no_generation(*a, **k):
        raise AssertionError("a point was generated with a draft that does not fit")

    monkeypatch.setattr(zoo_models, "load_image_pipeline", misfit_draft)
    monkeypatch.setattr(bi, "run", no_generation)
    with pytest.raises(ValueError, match="layout"):
        bi.main(["--sweep", "--tiny", "--bootstrap", "20", "--threads", "1", "--out", str(tmp_path)])
    assert not (tmp_path / "sweep_points").exists() or not any((tmp_path / "sweep_points").iterdir())
