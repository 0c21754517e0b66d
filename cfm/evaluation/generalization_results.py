"""generalization.jsonl records (compute_generalization.py) -> the curves and the table of plot_results.py:
the ratio histograms, the loss gap against t, per-class memorization of conditional checkpoints, the
distance to the memorizing field v*, and the Markdown table beside each checkpoint's best FID and
held-out local loss. How records are read and labelled is results.py's (this module builds on it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cfm.evaluation import results
from cfm.evaluation.generalization import wilson_interval
from cfm.evaluation.results import Curve, evaluations, format_mean_error, run_labels
from cfm.io.run_files import read_jsonl

# generalization.jsonl fields (section.field for a section's) that make an evaluation: records that
# differ in one were scored on other numbers; the first six, where they vary in a folder, label it.
GENERALIZATION_SETTING = ("checkpoint", "use_ema", "seed", "memorization.num", "guidance_scale", "label",
                          "memorization.samples",
                          "memorization.integration_method", "memorization.integration_steps", "memorization.tol",
                          "memorization_test.num", "loss_gap.images", "loss_gap.batch_size", "loss_gap.times")

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
            label = ", ".join([labels[run_dir], *(results.describe_field(f.rpartition(".")[2], _field(record, f)) for f in varying)])
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
                 results.describe_field("use_ema", r.get("use_ema")), r.get("seed"), f"{mem.get('num')} ({source})", format_memorized(mem),
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
