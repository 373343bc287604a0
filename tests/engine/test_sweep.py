"""Model sweep: every torchvision CNN under 60 M parameters plus 20+ timm families.

Run it alone with ``OMP_NUM_THREADS=2 python -m pytest -q tests/engine/test_sweep.py``
(about 5 min on 2 threads; one model: ``CNN_INTERNALS_SWEEP=timm:convnext_atto``).

Per model, for its first, middle and last ``nn.Conv2d`` (forward order), plus
the first conv behind a squeeze-and-excitation gate where there is one (the
middle and last convs of a 64-pixel input see the whole image, so that layer
is where the global-context field is really tested):

* ``field``: :func:`interp.receptive_field`'s clipped box of four units
  (two corners of a random channel, the centre of the first and the last
  channel) equals the bounding box of the gradient support of the model's
  positive twin (``tests/_sweep.py``); for a layer behind a global-context
  path the field must be global and its ``.spatial`` field must equal the
  support with the global reductions cut;
* ``projection``: :func:`interp.project` of the max unit of a random channel
  equals the rule applied by hand with autograd (guided and deconvnet,
  float64, max difference below 1e-6 of the largest value);
* ``mining``: :func:`interp.mine` runs and its top value per channel is the
  channel's maximum found by a plain forward hook;
* ``visualize``: :func:`interp.visualize` of one block (a container module
  holding the middle conv) writes its panel.

Images: random, 64 x 64 (80 for inception_v3, its minimum is 75); weights:
random (zero-initialised gains woken up, see ``_sweep.wake_zero_init``).

The models are built once each (module-scoped, parametrised fixture: pytest
runs all checks of one model before building the next). A time budget
(``CNN_INTERNALS_SWEEP_BUDGET`` seconds, default 480) skips the models left
when it runs out; ``CNN_INTERNALS_SWEEP`` (comma-separated ids such as
``tv:resnet18,timm:convnext_atto``) restricts the sweep. At the end the
coverage count is printed and written to ``sweep_coverage.json`` in pytest's
base temp folder (and to ``$CNN_INTERNALS_SWEEP_JSON`` if set).

Known engine limitations are marked ``xfail(strict=True)`` in ``KNOWN``
with the reason, so the suite stays green and a fix shows up as XPASS.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import time
import warnings

import pytest
import torch

import _sweep as S
import interp

BUDGET = float(os.environ.get("CNN_INTERNALS_SWEEP_BUDGET", "480"))
_ONLY = [s.strip() for s in os.environ.get("CNN_INTERNALS_SWEEP", "").split(",") if s.strip()]
CASES = _ONLY or S.case_ids()

# (case, check) -> reason: failures of the engine, checked against the
# references by hand. strict: an unexpected pass fails the suite.
KNOWN: dict[tuple[str, str], str] = {}

RECORDS: dict[str, S.Record] = {}
_T0: list[float] = []


@pytest.fixture(scope="module", autouse=True)
def _coverage_report(request, tmp_path_factory):
    """After the sweep: print the coverage count and write it as JSON."""
    yield
    if not RECORDS:
        return
    done = [r for r in RECORDS.values() if r.results]
    good = [r.case for r in done if r.ok()]
    bad = {r.case: {c: v for c, v in r.results.items() if v != "ok"} for r in done if not r.ok()}
    skipped = [c for c in CASES if c not in RECORDS or not RECORDS[c].results]
    covered = {f: sorted(r.case for r in done if f in r.features) for f in S.FEATURES}
    _, left_out = S.torchvision_cases()
    summary = {
        "models": len(CASES),
        "fully_correct": len(good),
        "run": len(done),
        "torchvision": sum(c.startswith("tv:") for c in CASES),
        "timm": sum(c.startswith("timm:") for c in CASES),
        "timm_families": len({S.timm_family(c) for c in CASES if c.startswith("timm:")}),
        "seconds": round(time.perf_counter() - _T0[0], 1) if _T0 else 0.0,
        "failing": bad,
        "skipped_for_time": skipped,
        "features": covered,
        "torchvision_left_out": left_out,
        "per_model": {r.case: {"params": r.params, "seconds": round(r.seconds, 2),
                                "times": {k: round(v, 2) for k, v in r.times.items()}, **r.results} for r in done},
    }
    line = (f"sweep: {len(good)}/{len(CASES)} models fully correct "
            f"({summary['torchvision']} torchvision, {summary['timm']} timm in {summary['timm_families']} families; "
            f"{summary['seconds']} s)")
    if bad:
        line += "; failing: " + ", ".join(f"{c} [{', '.join(v)}]" for c, v in bad.items())
    if skipped:
        line += f"; not run (time budget or stopped): {', '.join(skipped)}"
    missing = [f for f, cs in covered.items() if not cs]
    if missing:
        line += f"; features not covered: {', '.join(missing)}"
    paths = [tmp_path_factory.getbasetemp() / "sweep_coverage.json"]
    if os.environ.get("CNN_INTERNALS_SWEEP_JSON"):
        paths.append(os.environ["CNN_INTERNALS_SWEEP_JSON"])
    for p in paths:
        with open(p, "w") as fh:
            json.dump(summary, fh, indent=1)
    # Past pytest's output capture, so the count shows in every run, passing or not.
    capman = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        if reporter is not None:
            reporter.write_line("")
            reporter.write_line(line)
            reporter.write_line(f"sweep coverage written to {paths[-1]}")
        else:  # pragma: no cover
            print(line)


class Case:
    def __init__(self, case: str):
        self.case = case
        self.model, self.size = S.build(case)
        self.x = S.images(case, 2, self.size)
        order = S.conv_order(self.model, self.x[:1])
        self.middle = order[len(order) // 2]
        self.convs = S.pick_convs(order, S.first_conv_after_global(self.model, self.x[:1]))
        self._m64 = None
        self._twin = None

    @property
    def model64(self):
        if self._m64 is None:
            import copy

            self._m64 = copy.deepcopy(self.model).double().eval()
        return self._m64

    @property
    def twin(self):
        if self._twin is None:
            self._twin = S.positive_twin(self.model)
        return self._twin


@pytest.fixture(scope="module", params=CASES)
def case(request):
    if not _T0:
        _T0.append(time.perf_counter())
    name = request.param
    if time.perf_counter() - _T0[0] > BUDGET:
        pytest.skip(f"sweep time budget of {BUDGET:.0f} s spent")
    rec = RECORDS.setdefault(name, S.Record(name, features=S.features_of(name)))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = Case(name)
    rec.params = S.n_params(c.model)
    rec.features = S.detect_features(c.model, c.x[:1])
    if not _ONLY:  # an explicit CNN_INTERNALS_SWEEP list may name bigger models (vgg11 for checks)
        assert rec.params < S.MAX_PARAMS, f"{name} has {rec.params} parameters"
    rec.times["build"] = time.perf_counter() - t0
    rec.seconds += rec.times["build"]
    yield c
    del c
    gc.collect()


def _run(request, case, check, body):
    """Run one check, timing it and recording its outcome; apply the KNOWN xfail."""
    rec = RECORDS[case.case]
    known = KNOWN.get((case.case, check))
    if known:
        request.applymarker(pytest.mark.xfail(strict=True, reason=known))
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            body()
    except BaseException as exc:
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        rec.results[check] = f"{'xfail' if known else 'FAIL'}: {type(exc).__name__}: {msg}"
        raise
    else:
        rec.results[check] = "ok" if not known else "XPASS"
    finally:
        rec.times[check] = time.perf_counter() - t0
        rec.seconds += rec.times[check]


# -- (a) receptive field ---------------------------------------------------------


def _spatial(rf):
    sp = getattr(rf, "spatial", None)
    return sp if sp is not None else rf


def _box(rf, y, x, size, c):
    try:
        return rf.box(y, x, clip=(size, size), channel=c)
    except TypeError:
        return rf.box(y, x, clip=(size, size))


def check_field(c: Case) -> None:
    errors = []
    for layer in c.convs:
        with torch.no_grad():
            shape = S.outputs(c.model, c.x[:1], [layer])[layer].shape
        _, ch, h, w = shape
        g = torch.Generator().manual_seed(S.seed_of(c.case + layer))
        chan = int(torch.randint(ch, (1,), generator=g))
        # Corners (offset, padding, border clipping) of a random channel; the centre of the first
        # and last channel (per-channel fields after a concat / split).
        units = [(chan, 0, 0), (0, h // 2, w // 2), (ch - 1, h // 2, w // 2), (chan, h - 1, w - 1)]
        ref = S.support_boxes(c.twin, layer, units, c.size)
        rf = interp.receptive_field(c.model, layer, (c.size, c.size))
        sp = _spatial(rf)
        for (cc, y, x), full, local in zip(units, ref.full, ref.spatial):
            got_full = _box(rf, y, x, c.size, cc)
            if got_full != full:
                errors.append(f"{layer} unit {(cc, y, x)}: field box {got_full} != reference {full}")
            if local is not None:  # None: the layer sees the image only through global pooling
                got_local = _box(sp, y, x, c.size, cc)
                if got_local != local:
                    errors.append(f"{layer} unit {(cc, y, x)}: spatial box {got_local} != reference {local}")
            if full != local and not rf.is_global:
                errors.append(f"{layer}: global-context layer not reported is_global")
    assert not errors, "; ".join(errors[:4])


# -- (b) projection --------------------------------------------------------------


def check_projection(c: Case) -> None:
    x64 = c.x[:1].double()
    errors = []
    for layer in c.convs:
        with torch.no_grad():
            out = S.outputs(c.model64, x64, [layer])[layer]
        # The max unit of a random channel; another channel while the guided reference is all zero
        # (a dead unit makes a vacuous check).
        for attempt in range(4):
            unit = S.unit_for(f"{c.case}{layer}{attempt or ''}", out)
            refs = {"guided": S.reference_projection(c.model64, x64, layer, unit, "guided")}
            if float(refs["guided"][0].abs().max()) > 0:
                break
        refs["deconvnet"] = S.reference_projection(c.model64, x64, layer, unit, "deconvnet")
        for method in ("guided", "deconvnet"):
            ref, ref_out, _ = refs[method]
            if not torch.allclose(ref_out, out, rtol=1e-9, atol=1e-9):
                raise AssertionError(f"reference forward differs from the model at {layer} (harness bug)")
            got = interp.project(c.model64, x64, layer, [(0,) + unit], method=method)[0]
            scale = float(ref.abs().max())
            if scale == 0:  # a dead unit after every try: the engine must give zero too
                if float(got.abs().max()) != 0:
                    errors.append(f"{layer} {method}: reference is zero, engine is not (unit {unit})")
                continue
            err = float((got - ref).abs().max()) / scale
            if not err < 1e-6:
                errors.append(f"{layer} {method} unit {unit}: max |engine - reference| / max|reference| = {err:.3g}")
    assert not errors, "; ".join(errors[:4])


# -- (c) mining ---------------------------------------------------------------


def check_mining(c: Case) -> None:
    tk = interp.mine(c.model, c.x, c.convs, k=2, progress=False)
    with torch.no_grad():
        outs = S.outputs(c.model, c.x, c.convs)
    for layer in c.convs:
        # mine runs channels-last: other conv kernels, float32 rounding differs a little.
        tol = 1e-4 * max(1e-6, float(outs[layer].abs().max()))
        for ch in tk.channels(layer):
            top = tk[layer, ch][0]
            want = float(outs[layer][:, ch].amax())
            assert abs(top.value - want) <= tol, (layer, ch, top.value, want)
            assert abs(float(outs[layer][top.index, ch, top.y, top.x]) - top.value) <= tol, (layer, ch, top)


# -- (d) visualize a block ------------------------------------------------------


def check_visualize(c: Case, out_dir) -> None:
    block = S.pick_block(c.model, c.middle, c.x[:1])
    assert block is not None, "no block with a 4-D output found"
    res = interp.visualize(c.model, c.x, out_dir, layers=[block], channels=[0], k=1, methods=("guided",),
                           model_id="sweep", progress=False, batch_size=2)
    assert res.panels, "no panel written"
    for p in res.panels.values():
        assert os.path.isfile(p), p


def test_field(request, case):
    _run(request, case, "field", lambda: check_field(case))


def test_projection(request, case):
    _run(request, case, "projection", lambda: check_projection(case))


def test_mining(request, case):
    _run(request, case, "mining", lambda: check_mining(case))


def test_visualize_block(request, case, tmp_path):
    _run(request, case, "visualize", lambda: check_visualize(case, tmp_path))


def test_feature_coverage():
    """The whole sweep covers every feature of ``_sweep.FEATURES`` (detected, not tagged)."""
    if _ONLY or any(c not in RECORDS for c in CASES):
        pytest.skip("only with the whole sweep")
    covered = {f for r in RECORDS.values() for f in r.features}
    missing = [f for f in S.FEATURES if f not in covered]
    assert not missing, f"no model of the sweep uses {missing}"
    families = {S.timm_family(c) for c in CASES if c.startswith("timm:")}
    assert len(families) >= 20, sorted(families)
