"""Smoke test of the benchmark suite (fast: a tiny model, one repeat).

Checks the table and JSON structure, that every baseline agrees with ours on
a plain ReLU network, and that a wrong result really fails the run.
"""
from __future__ import annotations

import json
from dataclasses import replace
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

# The suite ships with the checkout, not the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import projection, run  # noqa: E402
from benchmarks.common import TOLERANCE, as_json, check, markdown, max_rel_diff  # noqa: E402

IMPLS = {"ours", "captum per-unit", "zennit batched", "naive per-unit"}


def tiny(*_args, **_kwargs) -> nn.Module:
    """A small local CNN with an in-place ReLU (the case Captum needs a copy for)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
    ).eval()


SMALL = projection.Settings(size=32, channels=2, images=3, repeats_ours=1, repeats_baseline=1, repeats_naive=1)


def test_projection_case_rows_agree():
    pytest.importorskip("zennit")
    rows = projection.run_case("tiny", "2", "guided", torch.device("cpu"), SMALL, model=tiny())
    assert {r.impl for r in rows} == IMPLS
    for r in rows:
        assert r.median_s > 0 and len(r.times_s) == 1
        assert r.status == "ok", (r.impl, r.max_rel_diff)
        if r.impl == "ours":
            assert r.ratio is None and r.max_rel_diff is None
        else:
            assert r.ratio > 0 and r.max_rel_diff <= TOLERANCE
            assert r.speedup == pytest.approx(1 / r.ratio)
    table = markdown(rows, "t")
    assert table.count("\n| tiny 2 guided (6 units, 32px) |") == len(IMPLS)
    doc = json.loads(json.dumps(as_json(rows)))
    assert {"bench", "case", "impl", "median_s", "ratio", "speedup", "max_rel_diff", "status"} <= set(doc[0])


def test_projection_case_in_float64():
    rows = projection.run_case("tiny", "2", "deconvnet", torch.device("cpu"), replace(SMALL, dtype="float64"),
                               model=tiny())
    assert all(r.case == "tiny 2 deconvnet (6 units, 32px, float64)" for r in rows)
    assert all(r.status == "ok" and (r.max_rel_diff or 0.0) < 1e-12 for r in rows)


def test_failing_row_names_its_units():
    status, note = check(2e-3, over=(1, 54))
    assert status == "FAIL" and note == "max rel diff 2.00e-03 > 1e-05 in 1 of 54 units"


def test_max_rel_diff_is_per_row_relative():
    ref = torch.tensor([[1.0, 0.0], [1000.0, 0.0]])
    assert max_rel_diff(ref, ref) == 0.0
    off = ref.clone()
    off[1, 1] = 1.0  # 1e-3 of row 1's scale
    assert max_rel_diff(off, ref) == pytest.approx(1e-3)


def test_suite_json_and_wrong_result_fails(tmp_path, monkeypatch):
    pytest.importorskip("zennit")
    monkeypatch.setattr(projection, "build_torchvision", tiny)
    small = projection.Settings(size=32, channels=2, images=2, repeats_ours=1, repeats_baseline=1, repeats_naive=1)
    monkeypatch.setattr(projection, "QUICK", small)
    out = tmp_path / "r.json"
    argv = ["--device", "cpu", "--quick", "--only", "projection", "--cases", "tiny:2", "--json", str(out)]
    assert run.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["env"]["device"] == "cpu" and doc["env"]["torch"] == torch.__version__
    assert doc["env"]["threads"] == torch.get_num_threads() and doc["env"]["device_name"]
    assert doc["failures"] == []
    assert {r["impl"] for r in doc["benchmarks"]["projection"]["rows"]} == IMPLS

    # A baseline that returns slightly different values must fail the run.
    real = projection.captum_per_unit
    monkeypatch.setattr(projection, "captum_per_unit", lambda *a, **k: real(*a, **k) * (1 + 1e-3))
    assert run.main(argv) == 1
    doc = json.loads(out.read_text())
    assert len(doc["failures"]) == 1 and "captum per-unit" in doc["failures"][0]
    bad = [r for r in doc["benchmarks"]["projection"]["rows"] if r["status"] == "FAIL"]
    assert [r["impl"] for r in bad] == ["captum per-unit"] and bad[0]["max_rel_diff"] > TOLERANCE


def test_bench_verb_is_wired():
    from interp.cli import build_parser

    args = build_parser().parse_args(["bench", "--quick", "--only", "mining"])
    assert args.quick and args.only == "mining" and callable(args.func)


def test_bad_options_are_one_line_errors(capsys):
    assert run.main(["--only", "projection,nope"]) == 2
    assert "unknown benchmark nope" in capsys.readouterr().err
    assert run.main(["--cases", "vgg16"]) == 2
    assert "write model:layer" in capsys.readouterr().err
    assert run.main(["--tf32"]) == 2  # CPU: there is no TF32 to allow
    assert "--tf32 applies to --device cuda only" in capsys.readouterr().err
    assert run.main(["--workers", "-1"]) == 2
    assert "--workers must be >= 0" in capsys.readouterr().err


def test_pass_size_follows_the_device():
    from interp.project import _auto_rows

    assert _auto_rows(224, 224) == 16 and _auto_rows(224, 224, "cpu") == 16
    assert _auto_rows(224, 224, "cuda") == 64  # the original's 54 units in one pass on a GPU
    assert _auto_rows(36, 36) == 256 and _auto_rows(36, 36, "cuda") == 256  # capped rows for small crops


def test_projection_distinct_units_and_flops():
    """The one-image-per-unit set: each unit on its own image; FLOPs counted for ours and Captum."""
    s = replace(SMALL, unit_set="distinct", flops=True, skip=("zennit", "naive"))
    rows = projection.run_case("tiny", "2", "guided", torch.device("cpu"), s, model=tiny())
    assert {r.impl for r in rows} == {"ours", "captum per-unit"}
    assert all(r.case == "tiny 2 guided (6 units on 6 images, 32px)" and r.status == "ok" for r in rows)
    ours, cap = sorted(rows, key=lambda r: r.impl != "ours")
    assert ours.extra["flops"] > 0 and ours.extra["flop_ratio"] == 1.0
    assert cap.extra["flops"] > ours.extra["flops"]  # Captum runs the whole network per unit
    assert cap.extra["flop_ratio"] == pytest.approx(cap.extra["flops"] / ours.extra["flops"])
    table = projection.flop_table(rows)
    assert "| tiny 2 guided (6 units on 6 images, 32px) |" in table and "FLOP ratio" in table


def test_distinct_units_sit_on_their_own_images():
    model = tiny()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    units = projection.make_units_distinct(model, "2", images, 2)
    assert sorted(u[0] for u in units) == list(range(6))
    assert [u[1] for u in units][:3] == [units[0][1]] * 3 and units[3][1] != units[0][1]
    shared = projection.make_units(model, "2", images, 2)
    assert set(units) <= set(shared)  # each at its channel's strongest position in its image


def test_count_flops_of_a_conv():
    conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
    x = torch.randn(1, 2, 8, 8)
    assert projection.count_flops(lambda: conv(x)) == 2 * 4 * 2 * 9 * 64  # 2 FLOPs per multiply-add


def test_suite_unit_sets_and_skips(tmp_path, monkeypatch):
    monkeypatch.setattr(projection, "build_torchvision", tiny)
    monkeypatch.setattr(projection, "QUICK", SMALL)
    out = tmp_path / "r.json"
    argv = ["--device", "cpu", "--quick", "--only", "projection", "--cases", "tiny:2", "--units", "shared,distinct",
            "--skip", "zennit,naive", "--flops", "--repeats-ours", "1", "--json", str(out)]
    assert run.main(argv) == 0
    rows = json.loads(out.read_text())["benchmarks"]["projection"]["rows"]
    assert {r["case"] for r in rows} == {"tiny 2 guided (6 units, 32px)", "tiny 2 guided (6 units on 6 images, 32px)"}
    assert {r["impl"] for r in rows} == {"ours", "captum per-unit"}
    assert all(r["extra"]["flops"] > 0 for r in rows)
    assert run.main(["--units", "nope"]) == 2
    assert run.main(["--skip", "captum"]) == 2
