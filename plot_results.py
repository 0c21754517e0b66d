"""Figures and a table from run folders (see results.py for what is read):

    python plot_results.py results/otcfm results/icfm data/weights --out figures/

writes to --out:
    training_curves.png   loss terms, grad_norm and FID against step, a curve per *metrics.jsonl file
    fid_vs_nfe.png        FID against the measured mean NFE (log-log), a curve per run and solver
    best_fid.md           the best FID of each run and solver (also printed)
    locality.md           held-out local and anchor losses per run (compute_locality.py; also printed)
    generalization.png    per run, the distribution of the nearest-neighbour ratio d1 / d2 (samples and
                          test images) and the train/test gap of loss_fm against t (compute_generalization.py)
    memorizing_field.png  per run, the distance of the net's field to the memorizing field v* against t,
                          on its own trajectories and on test-image paths (compute_generalization.py)
    generalization.md     memorization, loss gap, distance to v*, best FID and held-out local loss per run
                          (also printed)
    fid_vs_guidance.png   conditional checkpoints: FID (and KID, with its std, in a second panel where
                          recorded) against the guidance scale w, a curve per run and setting (compute_fid.py)
    memorization_per_class.png  conditional checkpoints: per class, the fraction memorized and the fraction
                          whose nearest training image is of the requested class, with 95% Wilson intervals,
                          samples and test images (compute_generalization.py)
A figure with nothing to draw is skipped, with a line saying so.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from absl import app, flags

from cfm.evaluation import generalization_results, results
from cfm.io.errors import UserError

FLAGS = flags.FLAGS

flags.DEFINE_string("out", "figures", "Folder for the figures and the table.")
flags.DEFINE_integer("dpi", 100, "Resolution of the PNG figures.", lower_bound=10)


# FID against NFE: a colour per run, a line style and marker per solver.
SOLVER_STYLES = {"euler": ("-", "o"), "midpoint": ("--", "s"), "heun": ("-.", "D"), "rk4": (":", "v"),
                 "dopri5": (":", "^")}


def colours(keys) -> dict:
    """A fixed colour per key (in first-seen order), so a run keeps its colour in every panel."""
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {key: cycle[i % len(cycle)] for i, key in enumerate(dict.fromkeys(keys))}


def draw_training_curves(curves: dict[str, list[results.Curve]], path: Path) -> None:
    import matplotlib.pyplot as plt

    colour = colours((c.run, c.series) for metric_curves in curves.values() for c in metric_curves)
    columns = min(3, len(curves))
    rows = math.ceil(len(curves) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    for ax, (metric, metric_curves) in zip(axes.flat, curves.items()):
        for curve in metric_curves:
            ax.plot(curve.x, curve.y, marker=".", markersize=4, linewidth=1, color=colour[curve.run, curve.series])
        ax.set(title=metric, xlabel="step")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(curves):]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], color=c, label=f"{run}/{series}") for (run, series), c in colour.items()]
    fig.legend(handles=handles, loc="lower center", ncol=min(3, len(handles)), fontsize="small")
    fig.tight_layout(rect=(0, 0.04 * math.ceil(len(handles) / 3), 1, 1))
    fig.savefig(path, dpi=FLAGS.dpi)
    plt.close(fig)


def draw_fid_vs_nfe(curves: list[results.Curve], path: Path) -> None:
    import matplotlib.pyplot as plt

    colour = colours(c.run for c in curves)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for curve in curves:
        linestyle, marker = SOLVER_STYLES[curve.series]
        ax.plot(curve.x, curve.y, linestyle=linestyle, marker=marker, markersize=4, color=colour[curve.run],
                label=f"{curve.run}: {curve.series}")
    ax.set(xscale="log", yscale="log", xlabel="mean NFE per sample", ylabel="FID", title="FID against NFE")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=FLAGS.dpi)
    plt.close(fig)


def draw_generalization(curves: list[results.Curve], path: Path) -> None:
    """Left: ratio histograms (samples solid, test images dashed; left of the 1/3 line: memorized; log density).
    Right: loss_fm(test) - loss_fm(train) against t (the 'gap' series), with standard-error bars."""
    import matplotlib.pyplot as plt

    histograms = [c for c in curves if c.series != "gap"]
    gaps = [c for c in curves if c.series == "gap"]
    colour = colours(c.run for c in curves)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for curve in histograms:
        left.step(curve.x, curve.y, where="mid", color=colour[curve.run],
                  linestyle="-" if curve.series == "samples" else "--", label=f"{curve.run}: {curve.series}")
    left.axvline(results.MEMORIZATION_RATIO, color="grey", linestyle=":", label="1/3: memorized below")
    # Log density: the memorized tail (about 1% of samples) would be flat on a linear axis; empty bins are left out.
    left.set_yscale("log", nonpositive="mask")
    left.set(xlim=(0, 1), xlabel="d1 / d2 (nearest / second-nearest training image)", ylabel="density (log)",
             title="nearest-neighbour ratio")
    for curve in gaps:
        right.errorbar(curve.x, curve.y, yerr=curve.error or None, marker="o", markersize=3, capsize=2,
                       color=colour[curve.run], label=curve.run)
    right.axhline(0, color="grey", linewidth=0.8)
    right.set(xlabel="t", ylabel="loss_fm(test) - loss_fm(train)", title="generalization gap")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=FLAGS.dpi)
    plt.close(fig)


def draw_memorizing_field(curves: list[results.Curve], path: Path) -> None:
    """E|v_net - v*|^2 / E|v*|^2 against t, one colour per run: solid on the net's own trajectories,
    dashed on test-image paths (0: the net is the memorizing field; 1: as far as the zero field)."""
    import matplotlib.pyplot as plt

    colour = colours(c.run for c in curves)
    styles = dict(zip(generalization_results.FIELD_POINT_SETS.values(), ("-", "--")))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for curve in curves:
        ax.plot(curve.x, curve.y, linestyle=styles[curve.series], marker="o", markersize=3, color=colour[curve.run],
                label=f"{curve.run}: {curve.series}")
    ax.set(xlabel="t", ylabel="E|v - v*|^2 / E|v*|^2", title="distance to the memorizing field")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=FLAGS.dpi)
    plt.close(fig)


def draw_fid_vs_guidance(curves: list[results.Curve], path: Path) -> None:
    """FID against the guidance scale w, a line per run (and setting); KID ± kid_std in a second panel
    where any record holds it."""
    import matplotlib.pyplot as plt

    colour = colours(c.run for c in curves)
    panels = [series for series in ("fid", "kid") if any(c.series == series for c in curves)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.2), squeeze=False)
    for ax, series in zip(axes.flat, panels):
        for curve in (c for c in curves if c.series == series):
            ax.errorbar(curve.x, curve.y, yerr=curve.error or None, marker="o", markersize=3, capsize=2,
                        color=colour[curve.run], label=curve.run)
        ax.set(xlabel="guidance scale w", ylabel=series.upper(), title=f"{series.upper()} against guidance scale")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=FLAGS.dpi)
    plt.close(fig)


# Per-class panels: the quantity of each and its axis label.
PER_CLASS_PANELS = {"memorized": "fraction memorized (d1 < d2 / 3)",
                    "nearest_class": "nearest training image of the class"}


def draw_memorization_per_class(curves: dict[str, list[results.Curve]], path: Path) -> None:
    """Per CIFAR-10 class, a panel per PER_CLASS_PANELS quantity: a line per evaluation, samples solid and
    test images dashed, with the 95% Wilson interval of each class as an error bar."""
    import matplotlib.pyplot as plt

    colour = colours(c.run for panel in curves.values() for c in panel)
    fig, axes = plt.subplots(1, len(curves), figsize=(6.4 * len(curves), 4.2), squeeze=False)
    for ax, (quantity, panel) in zip(axes.flat, curves.items()):
        for curve in panel:
            below = [y - low for y, (low, _) in zip(curve.y, curve.bounds)]
            above = [high - y for y, (_, high) in zip(curve.y, curve.bounds)]
            ax.errorbar(curve.x, curve.y, yerr=[below, above], marker="o", markersize=3, capsize=2,
                        linestyle="-" if curve.series == "samples" else "--", color=colour[curve.run],
                        label=f"{curve.run}: {curve.series}")
        ax.set(xlabel="class", ylabel=PER_CLASS_PANELS[quantity], title=f"{quantity.replace('_', ' ')} per class",
               xticks=range(10))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=FLAGS.dpi)
    plt.close(fig)


def main(argv):
    if len(argv) < 2:
        raise app.UsageError("name at least one run folder: plot_results.py RUN_DIR... --out figures/")
    try:
        run_dirs = results.check_run_dirs(argv[1:])
    except UserError as err:
        sys.exit(f"plot_results.py: {err}")
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)

    generalization = generalization_results.ratio_histograms(run_dirs) + generalization_results.gap_curves(run_dirs)
    per_class = {quantity: curves for quantity in PER_CLASS_PANELS
                 if (curves := generalization_results.per_class_curves(run_dirs, quantity))}
    figures = [("training_curves.png", results.training_curves(run_dirs), draw_training_curves, "*metrics.jsonl"),
               ("fid_vs_nfe.png", results.fid_curves(run_dirs), draw_fid_vs_nfe, "fid.jsonl records"),
               ("generalization.png", generalization, draw_generalization, "generalization.jsonl records"),
               ("memorizing_field.png", generalization_results.field_distance_curves(run_dirs), draw_memorizing_field,
                "distances to v* in generalization.jsonl"),
               ("fid_vs_guidance.png", results.guidance_curves(run_dirs), draw_fid_vs_guidance,
                "fid.jsonl records with a guidance_scale"),
               ("memorization_per_class.png", per_class, draw_memorization_per_class,
                "per-class memorization in generalization.jsonl")]
    for name, curves, draw, source in figures:
        if curves:
            draw(curves, out / name)
            print(f"drew {out / name}")
        else:
            print(f"no {source} in these folders: {name} not drawn")
    table = results.best_fid_table(run_dirs)
    (out / "best_fid.md").write_text(table)
    print(table, end="")
    locality = results.locality_table(run_dirs)
    if locality:
        (out / "locality.md").write_text(locality)
        print(locality, end="")
    generalization_table = generalization_results.generalization_table(run_dirs)
    if generalization_table:
        (out / "generalization.md").write_text(generalization_table)
        print(generalization_table, end="")


if __name__ == "__main__":
    app.run(main)
