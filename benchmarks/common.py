"""Shared machinery of the benchmark suite: timing, comparison, tables, JSON.

Every benchmark measures the candidates *interleaved* (one call of each per
round, rounds repeated), so that a slow spell of a shared machine hits all of
them alike, and reports the median of its rounds. Results are compared with
:func:`max_rel_diff`; a comparison above :data:`TOLERANCE` makes the row fail
unless the row is marked as a known, labelled rule difference.
"""
from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from typing import Callable, Sequence

import torch
import torchvision
from torch import nn

# Largest allowed max relative difference between ours and a baseline.
FP32_TOLERANCE = 1e-5
TOLERANCE = FP32_TOLERANCE
# With TF32 allowed (--tf32), every conv/matmul rounds its inputs to a 10-bit
# mantissa, differently for different operation orders: results then agree to
# about 1e-3 only, so the check is loosened to this (set by setup_device).
TF32_TOLERANCE = 1e-2


@dataclass
class Row:
    """One measured candidate of one benchmark case.

    Attributes
    ----------
    bench:
        Benchmark name (``projection``, ``mining``, ``e2e``, ``scaling``).
    case:
        What was measured, e.g. ``"vgg16 features.12 guided"``.
    impl:
        The candidate, e.g. ``"ours"`` or ``"captum per-unit"``.
    median_s:
        Median wall time over the repeats, seconds.
    times_s:
        Every repeat's wall time.
    ratio:
        ``ours / this`` time ratio (below 1: ours is faster); ``None`` for ours.
    max_rel_diff:
        Max relative difference of this candidate's result to ours (``None``
        when the candidate returns nothing comparable).
    status:
        ``"ok"``, ``"FAIL"`` (difference above tolerance) or ``"note"`` (a
        known rule difference, reported, not failed).
    note:
        Free text shown in the table.
    extra:
        Benchmark-specific numbers (split times, slopes).
    """

    bench: str
    case: str
    impl: str
    median_s: float | None
    times_s: list[float] = field(default_factory=list)
    ratio: float | None = None
    max_rel_diff: float | None = None
    status: str = "ok"
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        """How many times faster ours is than this candidate (``1 / ratio``)."""
        return None if not self.ratio else 1.0 / self.ratio


@dataclass
class Candidate:
    """A function to time, its repeat count, and a small warm-up call."""

    name: str
    fn: Callable[[], object]
    repeats: int
    warmup: Callable[[], object] | None = None


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so wall times are real (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(cands: Sequence[Candidate], device: torch.device | str) -> tuple[dict, dict]:
    """Time candidates round-robin; return ``(times per name, last result per name)``.

    Each candidate is first warmed up (its ``warmup`` call, or one full call)
    so that one-time costs (allocator, thread pools, conv plans, fx traces
    cached by the engine) do not land in the first repeat. A candidate with
    fewer repeats than the others simply sits out the later rounds.
    """
    for c in cands:
        (c.warmup or c.fn)()
        sync(device)
    times: dict[str, list[float]] = {c.name: [] for c in cands}
    results: dict[str, object] = {}
    for r in range(max(c.repeats for c in cands)):
        for c in cands:
            if r >= c.repeats:
                continue
            sync(device)
            t0 = time.perf_counter()
            out = c.fn()
            sync(device)
            times[c.name].append(time.perf_counter() - t0)
            results[c.name] = out
    return times, results


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(values))


def row_rel_diffs(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per row: ``max|ours - ref| / max|ref|`` (a 0-dim tensor is one row); see :func:`max_rel_diff`."""
    a = ours.detach().double().cpu()
    b = ref.detach().double().cpu()
    if a.shape != b.shape:
        raise ValueError(f"results have different shapes: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() == 0:
        a, b = a.reshape(1, 1), b.reshape(1, 1)
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    scale = b.abs().amax(dim=1).clamp_min(1e-30)
    scale = torch.where(b.abs().amax(dim=1) > 0, scale, torch.ones_like(scale))
    return (a - b).abs().amax(dim=1) / scale


def max_rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max over rows of ``max|ours - ref| / max|ref|`` (row 0-dim: the whole tensor).

    Each row is one unit's projection; scaling by that row's largest
    reference magnitude makes the number comparable across layers and avoids
    dividing by the exact zeros a projection has outside its field. A row
    whose reference is all zero is compared in absolute terms.
    """
    return float(row_rel_diffs(ours, ref).max())


def check(diff: float | None, known_difference: str = "", over: tuple[int, int] | None = None) -> tuple[str, str]:
    """Status and note for a comparison: ``ok``, ``FAIL``, or ``note`` for a labelled rule difference.

    ``over`` is ``(rows above the tolerance, rows)``, named in a failure's note:
    a wrong rule shows in every unit, a near-tie (a max pool or ReLU mask
    decided by a rounding difference) in a few.
    """
    if diff is None:
        return "ok", ""
    if known_difference:
        return "note", known_difference
    if diff <= TOLERANCE:
        return "ok", ""
    where = f" in {over[0]} of {over[1]} units" if over is not None else ""
    return "FAIL", f"max rel diff {diff:.2e} > {TOLERANCE:.0e}{where}"


def rows_from_times(bench: str, case: str, times: dict, ours: str, diffs: dict | None = None,
                    notes: dict | None = None, over: dict | None = None) -> list[Row]:
    """Build the rows of one case: ratios against ``ours`` and the difference checks."""
    diffs = diffs or {}
    notes = notes or {}
    over = over or {}
    t_ours = median(times[ours])
    rows = []
    for name, ts in times.items():
        med = median(ts)
        diff = diffs.get(name)
        status, note = check(diff, notes.get(name, ""), over.get(name))
        rows.append(Row(bench=bench, case=case, impl=name, median_s=med, times_s=[round(t, 5) for t in ts],
                        ratio=None if name == ours else t_ours / med, max_rel_diff=diff,
                        status=status, note=note))
    return rows


def setup_device(device: str, tf32: bool = False) -> torch.device:
    """The torch device for ``--device``; on CUDA TF32 is off (true fp32) unless ``tf32``.

    With ``tf32`` the run measures the speed users get with TF32 convolutions
    and matmuls, and the comparison tolerance becomes :data:`TF32_TOLERANCE`.
    """
    global TOLERANCE
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
        # TF32 rounds matmul/conv inputs to 10-bit mantissas: fine for
        # pictures, but it would hide real differences at the 1e-5 check.
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        TOLERANCE = TF32_TOLERANCE if tf32 else FP32_TOLERANCE
    elif tf32:
        raise ValueError("--tf32 applies to --device cuda only")
    return dev


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Machine facts recorded with every result."""
    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "tf32": (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
        if device.type == "cuda" else None,
    }
    try:
        import captum

        env["captum"] = captum.__version__
    except ImportError:
        env["captum"] = None
    try:
        env["zennit"] = version("zennit")
    except Exception:  # noqa: BLE001 - zennit is an optional extra
        env["zennit"] = None
    return env


def no_inplace_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose ``nn.ReLU`` modules are not in-place.

    Captum's and zennit's module backward hooks fail on an in-place ReLU;
    ``inplace`` never changes the values, so the copy computes the same
    function.
    """
    clone = copy.deepcopy(model)
    for m in clone.modules():
        if isinstance(m, (nn.ReLU, nn.ReLU6, nn.Hardtanh)) and getattr(m, "inplace", False):
            m.inplace = False
    return clone


def _fmt_s(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.3f}" if v >= 0.01 else f"{v * 1000:.2f} ms"


def _fmt_x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _fmt_d(v: float | None) -> str:
    return "—" if v is None else f"{v:.1e}"


def markdown(rows: Sequence[Row], title: str, ratio_label: str = "ours/this (time)",
             speedup_label: str = "ours faster by") -> str:
    """A markdown table of ``rows`` (one line per candidate)."""
    head = f"| case | impl | median s | {ratio_label} | {speedup_label} | max rel diff | check |"
    lines = [f"### {title}", "", head, "|" + " --- |" * 7]
    for r in rows:
        check_txt = r.status if not r.note else f"{r.status}: {r.note}"
        lines.append(f"| {r.case} | {r.impl} | {_fmt_s(r.median_s)} | {_fmt_x(r.ratio)} | {_fmt_x(r.speedup)} | "
                     f"{_fmt_d(r.max_rel_diff)} | {check_txt} |")
    return "\n".join(lines) + "\n"


def as_json(rows: Sequence[Row]) -> list[dict]:
    """Rows as plain dicts (with the derived speed-up)."""
    out = []
    for r in rows:
        d = asdict(r)
        d["speedup"] = r.speedup
        out.append(d)
    return out


def seeded(seed: int) -> torch.Generator:
    """A CPU generator with ``seed`` (inputs are made on CPU, then moved: same values on every device)."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def build_torchvision(name: str, seed: int = 0) -> nn.Module:
    """A torchvision classifier with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    kwargs: dict = {"weights": None}
    if name == "googlenet":
        # No auxiliary heads (eval ignores them anyway). Its own init (std
        # 0.01 truncated normal) leaves most inception4 channels dead at
        # random weights, which would make the comparisons trivially zero;
        # Kaiming init (as ResNet's) keeps activations alive.
        kwargs.update(aux_logits=False, init_weights=False)
    model = getattr(torchvision.models, name)(**kwargs)
    if name == "googlenet":
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model.eval()
