"""Run folders -> the numbers of a paper: training curves, FID against NFE, best FID per run and solver.

A run folder holds what training and compute_fid.py write there:

    *metrics.jsonl   training metrics, one record per log step (`metrics.jsonl`, or one file per run
                     name such as `otcfm_cifar10_metrics.jsonl`); `{"event": "start", ...}` lines mark
                     (re)starts, and non-finite values are stored as null
    fid.jsonl        one record per compute_fid.py setting: integration_method, integration_steps or
                     tol, mean_nfe, fid, num_gen, fid_split, checkpoint, use_ema, ...; a conditional
                     checkpoint's also guidance_scale, label (null: class-balanced) and kid, kid_std
    locality.jsonl   one record per compute_locality.py evaluation: the held-out local and anchor
                     losses and loss_fm (mean and standard error), split, seed, batches, ...
    generalization.jsonl  one record per compute_generalization.py evaluation: sections
                     `memorization` (generated samples), `memorization_test` (test images) and
                     `loss_gap` (loss_fm on train and test images against t); a conditional
                     checkpoint's also guidance_scale, label and, in both memorization sections,
                     `per_class` (fraction memorized and nearest-class fraction, Wilson intervals)

The generalization.jsonl curves and table are generalization_results.py's, built on this module.

Every file goes through ``run_files.read_jsonl`` (a torn line is skipped with a warning). The
plotting itself lives in plot_results.py; this module only reads and arranges, so it is tested
without drawing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cfm.evaluation.constants import LOCALITY_TERMS, MEMORIZATION_RATIO  # noqa: F401  (plot_results.py's too)
from cfm.io.errors import UserError
from cfm.io.run_files import read_jsonl

# fid.jsonl fields that tell evaluations of one run folder apart (other checkpoints, the raw net,
# the other reference, another sample count, a conditional checkpoint's guidance scale or label; an
# unconditional checkpoint's records have neither): a field that varies within a folder enters the label.
EVALUATION_FIELDS = ("checkpoint", "use_ema", "fid_split", "num_gen", "guidance_scale", "label")
# fid.jsonl fields that make one curve of FID against the guidance scale (with the solver setting).
GUIDANCE_CURVE_FIELDS = tuple(f for f in EVALUATION_FIELDS if f != "guidance_scale")
# locality.jsonl fields that make an evaluation: records that differ in one were scored on other numbers.
LOCALITY_SETTING = ("checkpoint", "use_ema", "split", "num_batches", "batch_size", "num_subclasses",
                    "cluster_algorithm", "cluster_seed", "seed")
# `regularized_loss` repeats `local_loss` / `anchor_loss` under the published name: not drawn twice.
ALIASES = ("regularized_loss",)


@dataclass
class Curve:
    """y against x for one run: `series` is a metrics file name (training) or a solver (FID)."""

    run: str
    series: str
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    error: list[float] = field(default_factory=list)  # standard errors of y, where known
    bounds: list[tuple[float, float]] = field(default_factory=list)  # an interval of each y (asymmetric), where known


def check_run_dirs(run_dirs: Sequence[str | Path]) -> list[Path]:
    """The run folders as paths; UserError (one sentence) if one does not exist."""
    paths = [Path(d) for d in run_dirs]
    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        raise UserError(f"no run folder at {', '.join(missing)}: pass folders that hold *metrics.jsonl or fid.jsonl.")
    return paths


def run_labels(run_dirs: Sequence[Path]) -> dict[Path, str]:
    """A short label per run folder: its name, or its whole path where two folders share a name."""
    names = [p.name for p in run_dirs]
    return {p: p.name if names.count(p.name) == 1 else str(p) for p in run_dirs}


def is_plotted_metric(key: str) -> bool:
    """Loss terms (`loss`, `loss_fm`, `local_loss`, ...), the gradient norm and the FID."""
    return key not in ALIASES and ("loss" in key or key in ("grad_norm", "fid"))


def training_curves(run_dirs: Sequence[Path]) -> dict[str, list[Curve]]:
    """metric -> one curve per metrics file (series: the file name), value against `step`.

    Start lines (`"event": ...`) and null values are skipped; metrics ordered `loss`, `loss_fm`,
    the other loss terms, grad_norm, fid.
    """
    curves: dict[str, list[Curve]] = {}
    labels = run_labels(run_dirs)
    for run_dir in run_dirs:
        for path in sorted(run_dir.glob("*metrics.jsonl")):
            per_file: dict[str, Curve] = {}
            for record in read_jsonl(path):
                if "event" in record or not isinstance(record.get("step"), (int, float)):
                    continue
                for key, value in record.items():
                    if is_plotted_metric(key) and isinstance(value, (int, float)) and not isinstance(value, bool):
                        curve = per_file.setdefault(key, Curve(labels[run_dir], path.name))
                        curve.x.append(record["step"])
                        curve.y.append(value)
            for key, curve in per_file.items():
                curves.setdefault(key, []).append(curve)

    def order(key: str) -> tuple:
        return (key != "loss", key != "loss_fm", "loss" not in key, key == "fid", key)

    return {key: curves[key] for key in sorted(curves, key=order)}


def setting_of(record: dict) -> str:
    """The solver setting of a fid.jsonl record, as written: '10 steps' or 'tol 1e-05'."""
    if record.get("integration_method") == "dopri5":
        return f"tol {record.get('tol'):g}"
    return f"{record.get('integration_steps')} steps"


@dataclass
class Evaluation:
    """The FID records of one run folder that share checkpoint, weights, reference and sample count."""

    label: str
    records: list[dict]  # the latest record per solver setting, in file order

    def solvers(self) -> list[str]:
        return list(dict.fromkeys(r["integration_method"] for r in self.records))


def describe_field(field_name: str, value) -> str:
    if field_name == "checkpoint":
        return Path(str(value)).stem
    if field_name == "use_ema":
        return "EMA" if value else "raw net"
    if field_name == "fid_split":
        return f"vs {value}"
    if field_name == "seed":
        return f"seed {value}"
    if field_name == "guidance_scale":
        return "unconditional" if value is None else f"w={value:g}"
    if field_name == "label":
        return "balanced labels" if value is None else f"label {value}"
    return f"{value} samples"


def evaluations(run_dirs: Sequence[Path]) -> list[Evaluation]:
    """The scored records (fid not null) of each folder's fid.jsonl, grouped by EVALUATION_FIELDS.

    A setting evaluated twice keeps its latest record. Labels name the run, plus the fields that
    vary within its folder (e.g. two checkpoints: their file names).
    """
    out = []
    labels = run_labels(run_dirs)
    for run_dir in run_dirs:
        records = [r for r in read_jsonl(run_dir / "fid.jsonl")
                   if isinstance(r.get("fid"), (int, float)) and r.get("integration_method")]
        varying = [f for f in EVALUATION_FIELDS if len({str(r.get(f)) for r in records}) > 1]
        groups: dict[tuple, dict[tuple, dict]] = {}
        for record in records:
            key = tuple(str(record.get(f)) for f in EVALUATION_FIELDS)
            setting = (record["integration_method"], setting_of(record))
            groups.setdefault(key, {}).pop(setting, None)  # re-inserted: the latest keeps file order
            groups[key][setting] = record
        for latest in groups.values():
            first = next(iter(latest.values()))
            label = ", ".join([labels[run_dir], *(describe_field(f, first.get(f)) for f in varying)])
            out.append(Evaluation(label, list(latest.values())))
    return out


def fid_curves(run_dirs: Sequence[Path]) -> list[Curve]:
    """FID against measured mean NFE: one curve per evaluation and solver, sorted by NFE."""
    curves = []
    for evaluation in evaluations(run_dirs):
        for solver in evaluation.solvers():
            points = sorted((r["mean_nfe"], r["fid"]) for r in evaluation.records if r["integration_method"] == solver)
            curves.append(Curve(evaluation.label, solver, [p[0] for p in points], [p[1] for p in points]))
    return curves


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def guidance_curves(run_dirs: Sequence[Path]) -> list[Curve]:
    """FID (series 'fid') and, where recorded, KID (series 'kid', error kid_std) against the guidance
    scale w: one curve per run folder, GUIDANCE_CURVE_FIELDS and solver setting, through the latest
    scored record of each scale, sorted by scale. Labels name the run, plus what varies in its folder."""
    curves = []
    labels = run_labels(run_dirs)
    for run_dir in run_dirs:
        records = [r for r in read_jsonl(run_dir / "fid.jsonl") if _is_number(r.get("guidance_scale"))
                   and _is_number(r.get("fid")) and r.get("integration_method")]
        parts = {id(r): [*(describe_field(f, r.get(f)) for f in GUIDANCE_CURVE_FIELDS),
                         f"{r['integration_method']} {setting_of(r)}"] for r in records}
        varying = [i for i in range(len(GUIDANCE_CURVE_FIELDS) + 1) if len({parts[id(r)][i] for r in records}) > 1]
        groups: dict[tuple, dict[float, dict]] = {}
        for record in records:  # in file order: a scale scored again keeps its latest record
            groups.setdefault(tuple(parts[id(record)]), {})[record["guidance_scale"]] = record
        for key, latest in groups.items():
            label = ", ".join([labels[run_dir], *(key[i] for i in varying)])
            scales = sorted(latest)
            curves.append(Curve(label, "fid", scales, [latest[w]["fid"] for w in scales]))
            scored = [w for w in scales if _is_number(latest[w].get("kid"))]
            if scored:
                errors = [latest[w].get("kid_std") for w in scored]
                curves.append(Curve(label, "kid", scored, [latest[w]["kid"] for w in scored],
                                    [e if _is_number(e) else math.nan for e in errors]))
    return curves


def best_fid_table(run_dirs: Sequence[Path]) -> str:
    """A Markdown table: the lowest FID of each evaluation and solver, with its setting and NFE."""
    rows = ["| run | solver | best FID | setting | mean NFE | samples | reference |", "|---|---|---:|---|---:|---:|---|"]
    for evaluation in evaluations(run_dirs):
        for solver in evaluation.solvers():
            best = min((r for r in evaluation.records if r["integration_method"] == solver), key=lambda r: r["fid"])
            rows.append(f"| {evaluation.label} | {solver} | {best['fid']:.2f} | {setting_of(best)} | "
                        f"{best['mean_nfe']:.1f} | {best.get('num_gen', '')} | {best.get('fid_split', 'train')} |")
    return "\n".join(rows) + "\n"


def locality_table(run_dirs: Sequence[Path]) -> str:
    """A Markdown table of held-out locality (compute_locality.py's locality.jsonl): a row per run
    and evaluation setting (its latest record), each term as mean ± standard error; "" when no
    folder has records. Rows with the same split, clusters, batches and seed share their numbers,
    so only those compare."""
    rows = []
    labels = run_labels(run_dirs)
    for run_dir in run_dirs:
        latest = {tuple(str(r.get(f)) for f in LOCALITY_SETTING): r for r in read_jsonl(run_dir / "locality.jsonl")}
        for r in latest.values():
            terms = " | ".join(format_mean_error(r.get(name), r.get(f"{name}_se")) for name in LOCALITY_TERMS)
            rows.append(f"| {labels[run_dir]} | {Path(str(r.get('checkpoint'))).stem} | {r.get('step')} | "
                        f"{describe_field('use_ema', r.get('use_ema'))} | {r.get('split')} | "
                        f"{r.get('num_batches')} x {r.get('batch_size')} | {r.get('seed')} | {terms} |")
    if not rows:
        return ""
    header = ["| run | checkpoint | step | weights | split | batches | seed | " + " | ".join(LOCALITY_TERMS) + " |",
              "|---|---|---:|---|---|---:|---:|" + "---:|" * len(LOCALITY_TERMS)]
    return "\n".join(header + rows) + "\n"


def format_mean_error(mean, error) -> str:
    """'0.1234 ± 0.0012'; the mean alone without a finite error (one batch); '-' without a mean
    (a non-finite value is stored as null)."""
    if not isinstance(mean, (int, float)):
        return "-"
    return f"{mean:.4g}" + (f" ± {error:.2g}" if isinstance(error, (int, float)) and math.isfinite(error) else "")
