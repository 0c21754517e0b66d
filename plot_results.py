"""Figures and a table from run folders (see results.py for what is read):

    python plot_results.py results/otcfm results/icfm data/weights --out figures/

writes to --out:
    training_curves.png   loss terms, grad_norm and FID against step, a curve per *metrics.jsonl file
    fid_vs_nfe.png        FID against the measured mean NFE (log-log), a curve per run and solver
    best_fid.md           the best FID of each run and solver (also printed)
    locality.md           held-out local and anchor losses per run (compute_locality.py; also printed)
A figure with nothing to draw is skipped, with a line saying so.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from absl import app, flags

import results
from utils_cifar import UserError

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

    figures = [("training_curves.png", results.training_curves(run_dirs), draw_training_curves, "*metrics.jsonl"),
               ("fid_vs_nfe.png", results.fid_curves(run_dirs), draw_fid_vs_nfe, "fid.jsonl records")]
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


if __name__ == "__main__":
    app.run(main)
