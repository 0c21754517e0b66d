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
# generalization.jsonl fields (section.field for a section's) that make an evaluation: records that
# differ in one were scored on other numbers; the first six, where they vary in a folder, label it.
GENERALIZATION_SETTING = ("checkpoint", "use_ema", "seed", "memorization.num", "guidance_scale", "label",
                          "memorization.samples",
                          "memorization.integration_method", "memorization.integration_steps", "memorization.tol",
                          "memorization_test.num", "loss_gap.images", "loss_gap.batch_size", "loss_gap.times")
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


def _describe(field_name: str, value) -> str:
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
            label = ", ".join([labels[run_dir], *(_describe(f, first.get(f)) for f in varying)])
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
        parts = {id(r): [*(_describe(f, r.get(f)) for f in GUIDANCE_CURVE_FIELDS),
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
                        f"{_describe('use_ema', r.get('use_ema'))} | {r.get('split')} | "
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


def _field(record: dict, name: str):
    """`record[name]`, or for 'section.field' `record[section][field]`; None where absent."""
    section, _, key = name.rpartition(".")
    holder = record.get(section) if section else record
    return holder.get(key) if isinstance(holder, dict) else None


@dataclass
class GeneralizationRecord:
    """The latest generalization.jsonl record of one evaluation setting of one run folder."""

    label: str
    run_dir: Path
    record: dict


def generalization_records(run_dirs: Sequence[Path]) -> list[GeneralizationRecord]:
    """The latest record of each GENERALIZATION_SETTING in each folder's generalization.jsonl,
    labelled by the run, plus its checkpoint, weights, seed and sample count where these vary in
    the folder."""
    out = []
    labels = run_labels(run_dirs)
    for run_dir in run_dirs:
        latest: dict[tuple, dict] = {}
        for record in read_jsonl(run_dir / "generalization.jsonl"):
            latest[tuple(str(_field(record, f)) for f in GENERALIZATION_SETTING)] = record
        varying = [f for f in GENERALIZATION_SETTING[:6] if len({str(_field(r, f)) for r in latest.values()}) > 1]
        for record in latest.values():
            label = ", ".join([labels[run_dir], *(_describe(f.rpartition(".")[2], _field(record, f)) for f in varying)])
            out.append(GeneralizationRecord(label, run_dir, record))
    return out


def ratio_histograms(run_dirs: Sequence[Path]) -> list[Curve]:
    """The distribution of d_(1) / d_(2) of each evaluation: series 'samples' (generated) and 'test
    images' (the real-data baseline); x the bin centres, y the density (fraction per bin / bin width)."""
    curves = []
    for evaluation in generalization_records(run_dirs):
        for section, series in (("memorization", "samples"), ("memorization_test", "test images")):
            counts = _field(evaluation.record, f"{section}.ratio_histogram")
            if not counts or not sum(counts):
                continue
            width = 1 / len(counts)
            curves.append(Curve(evaluation.label, series, [(i + 0.5) * width for i in range(len(counts))],
                                [c / sum(counts) / width for c in counts]))
    return curves


def gap_curves(run_dirs: Sequence[Path]) -> list[Curve]:
    """loss_fm(test) - loss_fm(train) against t, with standard errors: one curve per evaluation."""
    curves = []
    for evaluation in generalization_records(run_dirs):
        gap = evaluation.record.get("loss_gap") or {}
        if gap.get("times") and gap.get("gap"):
            error = [e if isinstance(e, (int, float)) else math.nan for e in gap.get("gap_se") or []]
            curves.append(Curve(evaluation.label, "gap", gap["times"], gap["gap"], error))
    return curves


# The memorization sections with per-class numbers (conditional checkpoints), as the plot names them.
PER_CLASS_SECTIONS = {"memorization": "samples", "memorization_test": "test images"}


def per_class_curves(run_dirs: Sequence[Path], quantity: str = "memorized") -> list[Curve]:
    """Per class, the `quantity` fraction of a conditional checkpoint's evaluation ("memorized", or
    "nearest_class": the nearest training image is of the requested class) with its 95% Wilson
    interval (`bounds`): one curve per evaluation and PER_CLASS_SECTIONS (series: its name), x the
    classes in order."""
    curves = []
    for evaluation in generalization_records(run_dirs):
        for section, series in PER_CLASS_SECTIONS.items():
            per_class = _field(evaluation.record, f"{section}.per_class") or {}
            classes = sorted(per_class, key=int)
            if classes:
                rows = [per_class[c] for c in classes]
                curves.append(Curve(evaluation.label, series, [int(c) for c in classes],
                                    [row[f"{quantity}_fraction"] for row in rows],
                                    bounds=[tuple(row[f"{quantity}_ci95"]) for row in rows]))
    return curves


# The point sets of compute_generalization.py's distance to v*, as the plot names them.
FIELD_POINT_SETS = {"trajectories": "own trajectories", "test_paths": "test-image paths"}


def field_distance_curves(run_dirs: Sequence[Path]) -> list[Curve]:
    """E|v_net - v*|^2 / E|v*|^2 against t (the memorizing_field section): one curve per evaluation and
    point set (series: FIELD_POINT_SETS' names)."""
    curves = []
    for evaluation in generalization_records(run_dirs):
        section = evaluation.record.get("memorizing_field") or {}
        for key, series in FIELD_POINT_SETS.items():
            distance = (section.get(key) or {}).get("distance")
            if section.get("times") and distance:
                curves.append(Curve(evaluation.label, series, section["times"], distance))
    return curves


def _same_checkpoint(record: dict, other: dict) -> bool:
    """Two records of one run folder score the same weights: the same checkpoint file and use_ema."""
    return (Path(str(record.get("checkpoint"))).name == Path(str(other.get("checkpoint"))).name
            and record.get("use_ema") == other.get("use_ema"))


def best_fid_of(run_dir: Path, record: dict) -> float | None:
    """The lowest FID (vs the train reference; the latest record of each setting) of `record`'s
    checkpoint and weights in the folder's fid.jsonl, None without one."""
    scores = [r["fid"] for evaluation in evaluations([run_dir]) for r in evaluation.records
              if _same_checkpoint(r, record) and r.get("fid_split", "train") == "train"]
    return min(scores, default=None)


def held_out_local_loss_of(run_dir: Path, record: dict) -> str:
    """The held-out local loss (the latest test-split locality.jsonl record of `record`'s checkpoint
    and weights) as mean ± standard error; '-' without one."""
    matching = [r for r in read_jsonl(run_dir / "locality.jsonl")
                if _same_checkpoint(r, record) and r.get("split") == "test"]
    return format_mean_error(matching[-1].get("local_loss"), matching[-1].get("local_loss_se")) if matching else "-"


# The normal quantile of a two-sided 95% interval.
Z_95 = 1.959963984540054


def wilson_interval(fraction: float, num: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (`fraction` of `num` trials):

        centre = (p + z^2 / 2n) / (1 + z^2 / n),   half = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)

    Unlike p ± z sqrt(p (1 - p) / n), it does not collapse to a point at p = 0 or 1 (0 of 64 is
    0-5.7%, not "0 ± 0%"), and it stays inside [0, 1]."""
    scale = 1 + z * z / num
    centre = (fraction + z * z / (2 * num)) / scale
    half = z * math.sqrt(fraction * (1 - fraction) / num + z * z / (4 * num * num)) / scale
    return max(0.0, centre - half), min(1.0, centre + half)


def format_memorized(section: dict) -> str:
    """A memorization section's memorized fraction as a percentage with its 95% Wilson interval,
    e.g. '0.8% (95% CI 0.64-0.99%)'; ± its standard error for a record without `num`; '-' without one."""
    mean, error, num = section.get("memorized_fraction"), section.get("memorized_fraction_se"), section.get("num")
    if not isinstance(mean, (int, float)):
        return "-"
    if isinstance(num, int) and num > 0:
        low, high = wilson_interval(mean, num)
        return f"{100 * mean:.2g}% (95% CI {100 * low:.2g}-{100 * high:.2g}%)"
    return format_mean_error(100 * mean, 100 * error if isinstance(error, (int, float)) else None) + "%"


def _number(value, digits: str = ".3f") -> str:
    return format(value, digits) if isinstance(value, (int, float)) else "-"


def generalization_table(run_dirs: Sequence[Path]) -> str:
    """A Markdown table of the headline numbers of each evaluation (compute_generalization.py), beside
    the best FID and the held-out local loss of the same checkpoint; "" when no folder has records.

    Columns: memorized (% of samples with d_(1) < d_(2) / 3, with its 95% Wilson interval), the median
    ratio and mean nearest distance, the same for the test images, loss_fm on train and test images
    and their gap (test - train, mean over times, ± standard error), the distance to the memorizing
    field v* over all times on the net's own trajectories and on test-image paths, and the memorized
    % of the v*-driven sampler's samples ('-' where not measured)."""
    rows = []
    for evaluation in generalization_records(run_dirs):
        r = evaluation.record
        mem, test, gap, vstar = (r.get(name) or {} for name in ("memorization", "memorization_test", "loss_gap",
                                                                "memorizing_field"))
        generated = mem.get("samples") == "generated"
        source = mem.get("integration_method") if generated else Path(str(mem.get("samples"))).name
        fid = best_fid_of(evaluation.run_dir, r)
        cells = [evaluation.label, Path(str(r.get("checkpoint"))).stem, r.get("step"),
                 _describe("use_ema", r.get("use_ema")), r.get("seed"), f"{mem.get('num')} ({source})", format_memorized(mem),
                 _number((mem.get("ratio_quantiles") or {}).get("0.5")), _number(mem.get("nearest_distance"), ".2f"),
                 format_memorized(test), _number((test.get("ratio_quantiles") or {}).get("0.5")),
                 _number(test.get("nearest_distance"), ".2f"),
                 *(format_mean_error(gap.get(name), gap.get(f"{name}_se"))
                   for name in ("loss_train", "loss_test", "loss_gap")),
                 *(_number((vstar.get(key) or {}).get("overall")) for key in FIELD_POINT_SETS),
                 format_memorized(vstar.get("sampler") or {}),
                 _number(fid, ".2f"), held_out_local_loss_of(evaluation.run_dir, r)]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    if not rows:
        return ""
    header = ["| run | checkpoint | step | weights | seed | samples | memorized | median ratio | nearest distance | "
              "test: memorized | test: median ratio | test: nearest distance | loss_fm train | loss_fm test | gap | "
              "to v*: own trajectories | to v*: test paths | v* sampler: memorized | best FID | local_loss (test) |",
              "|---|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    return "\n".join(header + rows) + "\n"
