"""`pretrain report DIR...`: a table and plots of a set of runs (a sweep's, or any run dirs).

    report.md, report.csv   point, nodes, GPUs, tokens/s (and per GPU), MFU, step time, peak
                            memory (and the planner's prediction), final train and validation
                            loss, wall time
    loss_vs_tokens.png      training loss (lines) and validation loss (markers) per run
    throughput_vs_nodes.png tokens/s against nodes per series (runs that differ only in their
                            node count), with the ideal line (linear from the fewest nodes) and
                            the scaling efficiency in percent
    loss_vs_compute.png     loss against training compute (model FLOPs, 6N + 12LHQT per token)
                            per run, and the power law L(C) = a C^-b + c fitted to each run's
                            final loss, with its parameters and fit quality
    report.json             the rows, every plotted series (x and y) and the fit

Everything comes from files the runs wrote: metrics.jsonl (training and evaluation lines, with
`time` and `elapsed` for the wall time across restarts), config.yaml, deepspeed_config.json and,
for sweep points, point.json (node count, the point's values).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from pretrain.config import Config
from pretrain.metrics import read_metrics

GiB = 2**30
CPU_BASE = 64 * 2**20
"""A base above this is a CPU run's resident set (a GPU's allocated memory starts near 0)."""


class ReportError(ValueError):
    """Nothing to report, or a directory that is not a run; says which."""


# ---------------------------------------------------------------------------------------------
# The power law


@dataclass
class PowerLawFit:
    """L(C) = a * C^-b + c, least squares (scipy's curve_fit, trust region with a >= 0,
    b >= 0, 0 <= c <= min L)."""

    a: float
    b: float
    c: float
    r2: float
    """Coefficient of determination of the fit on the points."""
    rmse: float
    n: int
    stderr: dict[str, float] | None
    """Standard errors of b and c (from the covariance), when there are more points than the 3
    parameters."""

    def __call__(self, compute):
        return self.a * np.power(np.asarray(compute, dtype=float), -self.b) + self.c

    def describe(self) -> str:
        err = ""
        if self.stderr:
            err = f" (+-{self.stderr['b']:.3g})"
        cerr = f" (+-{self.stderr['c']:.3g})" if self.stderr else ""
        return (f"L(C) = a * C^-b + c with a = {self.a:.4g}, b = {self.b:.4g}{err}, "
                f"c = {self.c:.4g}{cerr}; R^2 = {self.r2:.4f}, RMSE = {self.rmse:.4g}, "
                f"{self.n} points")


def fit_power_law(compute: Sequence[float], loss: Sequence[float]) -> PowerLawFit:
    """Fit L(C) = a C^-b + c to (compute, loss) points (at least 4, with distinct compute: 3
    points determine the curve exactly and say nothing about its quality).

    C is scaled by its geometric mean first (C^-b of 1e18 FLOPs underflows otherwise); the
    initial guess is c = 0.9 min L and a, b from a straight line through log(L - c) against
    log C."""
    from scipy.optimize import curve_fit

    C = np.asarray(compute, dtype=float)
    L = np.asarray(loss, dtype=float)
    if C.shape != L.shape or C.ndim != 1:
        raise ValueError("compute and loss must be sequences of the same length")
    keep = np.isfinite(C) & np.isfinite(L) & (C > 0)
    C, L = C[keep], L[keep]
    if len(np.unique(C)) < 4:
        raise ValueError(f"fitting 3 parameters needs at least 4 runs of different compute, "
                         f"got {len(np.unique(C))}")
    scale = float(np.exp(np.mean(np.log(C))))
    x = C / scale
    c0 = 0.9 * float(L.min())
    slope, intercept = np.polyfit(np.log(x), np.log(np.maximum(L - c0, 1e-12)), 1)
    p0 = [float(np.exp(intercept)), float(max(-slope, 1e-3)), c0]

    def model(x, A, b, c):
        return A * np.power(x, -b) + c

    upper_c = float(L.min())
    p0[2] = min(max(p0[2], 0.0), upper_c * (1 - 1e-9))
    (A, b, c), cov = curve_fit(model, x, L, p0=p0, bounds=([0, 0, 0], [np.inf, 10, upper_c]),
                               maxfev=20000)
    pred = model(x, A, b, c)
    ss_res = float(np.sum((L - pred) ** 2))
    ss_tot = float(np.sum((L - L.mean()) ** 2))
    stderr = None
    if np.all(np.isfinite(cov)):
        stderr = {"b": math.sqrt(max(float(cov[1, 1]), 0.0)),
                  "c": math.sqrt(max(float(cov[2, 2]), 0.0))}
    return PowerLawFit(a=float(A * scale**b), b=float(b), c=float(c),
                       r2=1 - ss_res / ss_tot if ss_tot > 0 else 1.0,
                       rmse=math.sqrt(ss_res / len(L)), n=len(L), stderr=stderr)


# ---------------------------------------------------------------------------------------------
# One run


@dataclass
class RunSummary:
    run_dir: str
    point: str
    nodes: int | None
    gpus: int
    tokens_per_sec: float | None
    tokens_per_sec_per_gpu: float | None
    mfu: float | None
    step_time: float | None
    peak_mem_bytes: int | None
    """Peak over ranks and steps, above the base (what the planner predicts)."""
    peak_mem_abs_bytes: int | None
    """The absolute peak (on CPU, the process's resident set, interpreter included)."""
    planned_mem_bytes: float | None
    device: str | None
    final_loss: float | None
    final_val_loss: float | None
    wall_time: float | None
    steps: int
    tokens_seen: int
    compute: float | None
    """Training compute in model FLOPs: FLOPs per token x tokens seen."""
    series: str
    """What the run is besides its node count (for the scaling plot)."""
    values: dict = field(default_factory=dict)
    train_curve: list[tuple[float, float]] = field(default_factory=list, repr=False)
    val_curve: list[tuple[float, float]] = field(default_factory=list, repr=False)


def _steady(lines: list[dict]) -> list[dict]:
    """Training lines without each process's first one (its window holds the warm-up)."""
    by_start: dict[int, list[dict]] = {}
    for r in lines:
        start = round(r["time"] - r["elapsed"]) if "time" in r and "elapsed" in r else 0
        by_start.setdefault(start, []).append(r)
    out = []
    for group in by_start.values():
        out += group[1:] if len(group) > 1 else group
    return out


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def wall_time(records: list[dict]) -> float | None:
    """Seconds the run's processes ran, summed over restarts (each from its process start to
    its last line), not counting time between them (queue, preemption)."""
    spans: dict[int, float] = {}
    for r in records:
        if "time" not in r or "elapsed" not in r:
            continue
        start = round(r["time"] - r["elapsed"])
        spans[start] = max(spans.get(start, 0.0), r["elapsed"])
    return sum(spans.values()) if spans else None


def summarize_run(run_dir: Path) -> RunSummary:
    from pretrain.checkpoint import CheckpointManager
    from pretrain.planner import Layout, count_params, flops_per_token, plan

    config_path = run_dir / "config.yaml"
    records = read_metrics(run_dir)
    if not config_path.is_file() or not records:
        raise ReportError(f"{run_dir} is not a run directory with metrics (config.yaml and "
                          "metrics.jsonl)")
    cfg = Config.model_validate(yaml.safe_load(config_path.read_text()))
    point = {}
    if (run_dir / "point.json").is_file():
        point = json.loads((run_dir / "point.json").read_text())
    ds = {}
    if (run_dir / "deepspeed_config.json").is_file():
        ds = json.loads((run_dir / "deepspeed_config.json").read_text())
    tp = cfg.parallel.tensor_parallel
    per_rank = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    world = point.get("world_size") or (ds["train_batch_size"] // per_rank * tp if ds else 1)
    nodes = point.get("nodes")
    vocab = None
    latest = CheckpointManager(run_dir, 1, 0, 1).latest_step()
    if latest is not None:
        state_file = run_dir / "checkpoints" / f"step-{latest:08d}" / "train_state.json"
        vocab = json.loads(state_file.read_text()).get("vocab_size")
    from pretrain.planner import resolve_vocab_size

    vocab = vocab or resolve_vocab_size(cfg)
    params = count_params(cfg.model, vocab, cfg.data.seq_len)
    fpt = flops_per_token(cfg, params)

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    # a resumed run re-logs the steps after its checkpoint: the last line of a step wins
    train = list({r["step"]: r for r in train}.values())
    steady = _steady(train)
    tps = _median([r.get("tokens_per_sec") for r in steady])
    mfu = _median([r.get("mfu") for r in steady])
    if mfu is None and tps and cfg.logging.peak_tflops:
        mfu = fpt * tps / world / (cfg.logging.peak_tflops * 1e12)
    peaks = [(r["peak_mem_bytes"], r.get("base_mem_bytes", 0)) for r in train
             if r.get("peak_mem_bytes") is not None]
    peak = max((p - b for p, b in peaks), default=None)
    peak_abs = max((p for p, _ in peaks), default=None)
    device = None
    if peaks:
        device = "cpu" if max(b for _, b in peaks) > CPU_BASE else "gpu"
    planned = None
    if device is not None:
        ranks_per_node = point.get("ranks_per_node") or world
        layout = Layout.from_config(cfg, nodes or max(world // ranks_per_node, 1),
                                    ranks_per_node if nodes else world, device=device)
        planned = plan(cfg, layout, vocab_size=vocab).peak
    tokens_per_step = cfg.data.seq_len * per_rank * (world // tp)
    tokens_seen = train[-1]["tokens_seen"] if train else 0
    values = point.get("values") or {}
    series = ", ".join(f"{k}={v}" for k, v in values.items() if k not in ("nodes", "name"))
    return RunSummary(
        run_dir=str(run_dir), point=point.get("point") or cfg.run.name or run_dir.name,
        nodes=nodes, gpus=world, tokens_per_sec=tps,
        tokens_per_sec_per_gpu=tps / world if tps else None, mfu=mfu,
        step_time=_median([r.get("step_time") for r in steady]), peak_mem_bytes=peak,
        peak_mem_abs_bytes=peak_abs, planned_mem_bytes=planned, device=device,
        final_loss=train[-1]["loss"] if train else None,
        final_val_loss=evals[-1]["val_loss"] if evals else None,
        wall_time=wall_time(records), steps=train[-1]["step"] if train else 0,
        tokens_seen=tokens_seen, compute=fpt * tokens_seen if tokens_seen else None,
        series=series if point else run_dir.name, values=values,
        train_curve=[(r["tokens_seen"], r["loss"]) for r in train],
        val_curve=[(r["step"] * tokens_per_step, r["val_loss"]) for r in evals])


def find_runs(dirs: Sequence[str | Path]) -> list[Path]:
    """Run directories in `dirs`: a sweep directory (sweep.json: its points, in order), a run
    directory (metrics.jsonl), or a directory holding run directories."""
    runs: list[Path] = []
    for d in map(Path, dirs):
        if (d / "sweep.json").is_file():
            state = json.loads((d / "sweep.json").read_text())
            runs += [Path(p["run_dir"]) for p in state["points"]
                     if (Path(p["run_dir"]) / "metrics.jsonl").is_file()]
        elif (d / "metrics.jsonl").is_file():
            runs.append(d)
        elif d.is_dir():
            runs += sorted(p.parent for p in d.glob("*/metrics.jsonl"))
        else:
            raise ReportError(f"{d}: no such directory")
    if not runs:
        raise ReportError(f"no runs with metrics under {', '.join(map(str, dirs))}")
    return list(dict.fromkeys(runs))


# ---------------------------------------------------------------------------------------------
# Scaling and tables


def scaling(rows: list[RunSummary]) -> list[dict]:
    """Per series and node count: tokens/s, the ideal (linear from the series' fewest nodes)
    and the efficiency, measured / ideal."""
    out = []
    by_series: dict[str, list[RunSummary]] = {}
    for r in rows:
        if r.tokens_per_sec:
            by_series.setdefault(r.series, []).append(r)
    for series, runs in by_series.items():
        runs = sorted(runs, key=lambda r: (r.nodes or 1, r.gpus))
        base = runs[0]
        unit = base.gpus if any(r.nodes is None for r in runs) else (base.nodes or 1)
        for r in runs:
            n = r.gpus if any(x.nodes is None for x in runs) else (r.nodes or 1)
            ideal = base.tokens_per_sec * n / unit
            out.append({"series": series, "point": r.point, "nodes": r.nodes or 1,
                        "gpus": r.gpus, "tokens_per_sec": r.tokens_per_sec, "ideal": ideal,
                        "efficiency": r.tokens_per_sec / ideal})
    return out


COLUMNS = [("point", "point"), ("nodes", "nodes"), ("gpus", "GPUs"),
           ("tokens_per_sec", "tokens/s"), ("tokens_per_sec_per_gpu", "tokens/s per GPU"),
           ("mfu", "MFU"), ("step_time", "step time (s)"), ("peak_mem_bytes", "peak mem (GiB)"),
           ("planned_mem_bytes", "planned (GiB)"), ("final_loss", "final loss"),
           ("final_val_loss", "final val loss"), ("wall_time", "wall time")]


def _fmt(key: str, value) -> str:
    if value is None:
        return "-"
    if key in ("tokens_per_sec", "tokens_per_sec_per_gpu"):
        return f"{value:,.0f}"
    if key == "mfu":
        return f"{100 * value:.1f}%"
    if key == "step_time":
        return f"{value:.3f}"
    if key.endswith("mem_bytes"):
        return f"{value / GiB:.3f}"
    if key.endswith("loss"):
        return f"{value:.4f}"
    if key == "wall_time":
        m, s = divmod(int(round(value)), 60)
        h, m = divmod(m, 60)
        return f"{h}:{m:02d}:{s:02d}"
    return str(value)


def markdown(rows: list[RunSummary], scale: list[dict], fit: PowerLawFit | None,
             fit_note: str) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(k, getattr(r, k)) for k, _ in COLUMNS) + " |")
    lines.append("")
    lines.append("peak mem: the largest peak over ranks and steps above the process's memory "
                 "before the model was built (GPU: allocated tensors); planned: "
                 "`pretrain plan` for the same layout.")
    if scale:
        lines += ["", "## Scaling", "", "| series | nodes | GPUs | tokens/s | ideal | efficiency |",
                  "|---|---|---|---|---|---|"]
        for s in scale:
            lines.append(f"| {s['series'] or '-'} | {s['nodes']} | {s['gpus']} | "
                         f"{s['tokens_per_sec']:,.0f} | {s['ideal']:,.0f} | "
                         f"{100 * s['efficiency']:.1f}% |")
    lines += ["", "## Loss against compute", "", fit.describe() if fit else fit_note]
    lines += ["", "![loss vs tokens](loss_vs_tokens.png)",
              "![throughput vs nodes](throughput_vs_nodes.png)",
              "![loss vs compute](loss_vs_compute.png)", ""]
    return "\n".join(lines)


def csv_text(rows: list[RunSummary]) -> str:
    keys = [k for k, _ in COLUMNS] + ["peak_mem_abs_bytes", "device", "steps", "tokens_seen",
                                      "compute", "run_dir"]
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(keys)
    for r in rows:
        w.writerow(["" if getattr(r, k) is None else getattr(r, k) for k in keys])
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# Plots


def plots(rows: list[RunSummary], scale: list[dict], fit: PowerLawFit | None,
          out: Path) -> dict:
    """Write the three PNGs; returns every plotted series (for report.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn: dict[str, list[dict]] = {"loss_vs_tokens": [], "throughput_vs_nodes": [],
                                    "loss_vs_compute": []}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(rows):
        color = f"C{i % 10}"
        if r.train_curve:
            x, y = zip(*r.train_curve)
            ax.plot(x, y, color=color, lw=1.2, label=f"{r.point} train")
            drawn["loss_vs_tokens"].append({"label": f"{r.point} train", "x": list(x),
                                            "y": list(y)})
        if r.val_curve:
            x, y = zip(*r.val_curve)
            ax.plot(x, y, color=color, ls="--", marker="o", ms=4, label=f"{r.point} val")
            drawn["loss_vs_tokens"].append({"label": f"{r.point} val", "x": list(x),
                                            "y": list(y)})
    ax.set(xlabel="tokens", ylabel="loss", title="Loss against tokens")
    _save(plt, fig, ax, out / "loss_vs_tokens.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_series: dict[str, list[dict]] = {}
    for s in scale:
        by_series.setdefault(s["series"], []).append(s)
    for i, (series, points) in enumerate(by_series.items()):
        color = f"C{i % 10}"
        x = [p["nodes"] for p in points]
        name = series or "runs"
        ax.plot(x, [p["tokens_per_sec"] for p in points], color=color, marker="o",
                label=f"{name} measured")
        ax.plot(x, [p["ideal"] for p in points], color=color, ls=":", label=f"{name} ideal")
        for p in points:
            ax.annotate(f"{100 * p['efficiency']:.0f}%", (p["nodes"], p["tokens_per_sec"]),
                        textcoords="offset points", xytext=(4, -12), fontsize=8)
        drawn["throughput_vs_nodes"] += [
            {"label": f"{name} measured", "x": x, "y": [p["tokens_per_sec"] for p in points],
             "efficiency": [p["efficiency"] for p in points]},
            {"label": f"{name} ideal", "x": x, "y": [p["ideal"] for p in points]}]
    ax.set_xticks(sorted({s["nodes"] for s in scale}) or [1])
    ax.set(xlabel="nodes", ylabel="tokens/s", title="Throughput against nodes (ideal: linear)")
    _save(plt, fig, ax, out / "throughput_vs_nodes.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    finals = []
    for i, r in enumerate(rows):
        color = f"C{i % 10}"
        fpt = r.compute / r.tokens_seen if r.compute and r.tokens_seen else None
        curve = r.val_curve or r.train_curve
        if fpt and curve:
            x = [t * fpt for t, _ in curve if t > 0]
            y = [v for t, v in curve if t > 0]
            ax.plot(x, y, color=color, lw=1, alpha=0.7, label=r.point)
            drawn["loss_vs_compute"].append({"label": r.point, "x": x, "y": y})
        final = r.final_val_loss if r.final_val_loss is not None else r.final_loss
        if r.compute and final is not None:
            finals.append((r.compute, final))
            ax.plot([r.compute], [final], color=color, marker="o")
    if finals:
        drawn["loss_vs_compute"].append({"label": "final", "x": [c for c, _ in finals],
                                         "y": [v for _, v in finals]})
    if fit is not None:
        lo, hi = min(c for c, _ in finals), max(c for c, _ in finals)
        xs = np.geomspace(lo / 1.5, hi * 1.5, 100)
        label = f"fit: {fit.a:.3g} C^-{fit.b:.3g} + {fit.c:.3g} (R^2 {fit.r2:.3f})"
        ax.plot(xs, fit(xs), "k--", lw=1.2, label=label)
        drawn["loss_vs_compute"].append({"label": "fit", "x": xs.tolist(),
                                         "y": fit(xs).tolist()})
    ax.set_xscale("log")
    ax.set(xlabel="training compute (model FLOPs)", ylabel="loss (validation where logged)",
           title="Loss against compute")
    _save(plt, fig, ax, out / "loss_vs_compute.png", grid="both")
    return drawn


def _save(plt, fig, ax, path: Path, grid: str = "major") -> None:
    """Legend, grid, layout; write the PNG and free the figure."""
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which=grid)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The report


def build_report(dirs: Sequence[str | Path], out: Path) -> tuple[str, Path]:
    """Summarize the runs under `dirs` into `out`; returns the markdown and `out`."""
    rows = [summarize_run(d) for d in find_runs(dirs)]
    scale = scaling(rows)
    finals = [(r.compute, r.final_val_loss if r.final_val_loss is not None else r.final_loss)
              for r in rows if r.compute]
    fit, note = None, ""
    try:
        fit = fit_power_law([c for c, _ in finals], [v for _, v in finals])
    except ValueError as e:
        note = f"no power-law fit: {e}"
    except RuntimeError as e:  # curve_fit did not converge
        note = f"no power-law fit: {e}"
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, scale, fit, note)
    (out / "report.md").write_text(text)
    (out / "report.csv").write_text(csv_text(rows))
    drawn = plots(rows, scale, fit, out)
    data = {"rows": [{k: v for k, v in asdict(r).items()
                      if k not in ("train_curve", "val_curve")} for r in rows],
            "scaling": scale, "fit": asdict(fit) if fit else None, "fit_note": note,
            "plots": drawn}
    (out / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    return text, out
