"""plot_results.py and results.py on the fixture run folders in tests/data/runs (synthetic numbers,
written in the formats training, compute_fid.py, compute_locality.py and compute_generalization.py
write: start lines, nulls, a torn line, a metrics file per run name beside metrics.jsonl, a
re-evaluated setting, a test-split record, a null FID, held-out locality on both splits,
generalization of the EMA and the raw net, one re-evaluated)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SUBPROCESS_TIMEOUT_S
from matplotlib.colors import to_rgba
from PIL import Image

from cfm.evaluation import generalization_results, results
from cfm.io.errors import UserError

REPO = Path(__file__).resolve().parents[1]
RUNS = sorted((REPO / "tests" / "data" / "runs").iterdir())


def parse(path):
    """The JSON object lines of a file, read here without the library's reader."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


@pytest.mark.filterwarnings("ignore:.*torn write")
def test_training_curves_are_one_per_metrics_file_without_start_lines_or_nulls():
    curves = results.training_curves(RUNS)
    assert list(curves) == ["loss", "loss_fm", "local_loss", "grad_norm", "fid"]  # regularized_loss: an alias
    files = sorted(p for run in RUNS for p in run.glob("*metrics.jsonl"))
    assert len(files) == 4 and {(c.run, c.series) for c in curves["loss"]} == {(p.parent.name, p.name) for p in files}
    for metric, metric_curves in curves.items():
        for curve in metric_curves:
            points = [(r["step"], r[metric]) for r in parse(REPO / "tests/data/runs" / curve.run / curve.series)
                      if "event" not in r and r.get(metric) is not None]
            assert list(zip(curve.x, curve.y)) == points and points
    skipped = [r for p in files for r in parse(p) if "grad_norm" in r and r["grad_norm"] is None]
    assert len(skipped) == 1  # the fixture's null is there, and was left out above


def test_the_torn_line_is_skipped_with_a_warning():
    with pytest.warns(UserWarning, match=r"otcfm/metrics.jsonl:\d+ is not a JSON record"):
        results.training_curves([REPO / "tests/data/runs/otcfm"])


def latest_scored(run_dir, **match):
    """Latest record per solver setting among the scored fid.jsonl records matching `match`."""
    latest = {}
    for r in parse(run_dir / "fid.jsonl"):
        if r["fid"] is not None and all(r.get(k) == v for k, v in match.items()):
            latest[r["integration_method"], r.get("integration_steps"), r.get("tol")] = r
    return list(latest.values())


def test_fid_curves_and_best_fid_table_follow_the_latest_record_of_each_setting():
    otcfm, icfm = REPO / "tests/data/runs/otcfm", REPO / "tests/data/runs/icfm"
    groups = {"icfm": latest_scored(icfm), "otcfm, vs train": latest_scored(otcfm, fid_split="train"),
              "otcfm, vs test": latest_scored(otcfm, fid_split="test")}
    curves = results.fid_curves(RUNS)
    assert {(c.run, c.series) for c in curves} == {(g, r["integration_method"]) for g, rs in groups.items() for r in rs}
    table = results.best_fid_table(RUNS).splitlines()
    assert len(table) == 2 + len(curves)
    for curve in curves:
        records = [r for r in groups[curve.run] if r["integration_method"] == curve.series]
        assert curve.x == sorted(r["mean_nfe"] for r in records) and curve.x == sorted(curve.x)
        assert sorted(zip(curve.x, curve.y)) == sorted((r["mean_nfe"], r["fid"]) for r in records)
        best = min(records, key=lambda r: r["fid"])
        assert f"| {curve.run} | {curve.series} | {best['fid']:.2f} | " in "\n".join(table)
    # The superseded (lower) dopri5 value of the re-evaluated setting is not reported.
    stale = [r["fid"] for r in parse(otcfm / "fid.jsonl") if r["integration_method"] == "dopri5"]
    assert min(stale) < min(r["fid"] for r in groups["otcfm, vs train"]) and f"{min(stale):.2f}" not in "\n".join(table)


def test_a_missing_run_folder_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match=f"no run folder at {tmp_path / 'nope'}: pass folders"):
        results.check_run_dirs([REPO / "tests/data/runs/otcfm", tmp_path / "nope"])


def test_the_script_renders_every_figure_and_the_table(tmp_path):
    out = tmp_path / "figures"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "plot_results.py"), *map(str, RUNS), f"--out={out}", "--dpi=50"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out / "fid_vs_nfe.png") as image:
        assert image.size == (320, 210)  # 6.4 x 4.2 inches at 50 dpi
    with Image.open(out / "training_curves.png") as image:
        assert image.size == (675, 320)  # 3 x 2 panels of 4.5 x 3.2 inches
    table = (out / "best_fid.md").read_text()
    assert table == results.best_fid_table(RUNS) and table in proc.stdout
    with pytest.warns(UserWarning, match="torn write"):
        locality = results.locality_table(RUNS)
    assert (out / "locality.md").read_text() == locality and locality in proc.stdout
    with Image.open(out / "generalization.png") as image:
        assert image.size == (550, 210)  # 11 x 4.2 inches
    with pytest.warns(UserWarning, match="torn write"):
        generalization = generalization_results.generalization_table(RUNS)
    assert (out / "generalization.md").read_text() == generalization and generalization in proc.stdout


@pytest.mark.filterwarnings("ignore:.*torn write")
def test_locality_table_keeps_the_latest_record_of_each_setting():
    table = results.locality_table(RUNS).splitlines()
    assert table[0].startswith("| run | checkpoint | step | weights | split | batches | seed | local_loss |")
    rows = {tuple(cell.strip() for cell in row.strip("|").split("|")[:5:4]): row for row in table[2:]}
    assert set(rows) == {("otcfm", "test"), ("otcfm", "train"), ("otcfm_local_1e0", "test")}
    assert "| 0.45 ± 0.01 | 0.37 ± 0.01 | 0.29 ± 0.01 | 0.22 ± 0.01 |" in rows["otcfm", "test"]  # not 0.5: re-evaluated
    assert "| 100 x 128 | 0 | 0.12 | 0.2 | 0.25 | 0.23 |" in rows["otcfm_local_1e0", "test"]  # no standard error stored
    assert results.locality_table([REPO / "tests/data/runs/icfm"]) == ""


@pytest.mark.filterwarnings("ignore:.*torn write")
def test_generalization_table_keeps_the_latest_record_beside_the_best_fid_and_local_loss():
    table = generalization_results.generalization_table(RUNS).splitlines()
    assert table[0].startswith("| run | checkpoint | step | weights | seed | samples | memorized | median ratio |")
    rows = {row.split(" | ")[0].lstrip("| "): row for row in table[2:]}
    assert set(rows) == {"otcfm, EMA", "otcfm, raw net", "otcfm_local_1e0"}
    latest = [r for r in parse(REPO / "tests/data/runs/otcfm/generalization.jsonl") if r["use_ema"]][-1]
    mem, gap = latest["memorization"], latest["loss_gap"]
    assert mem["memorized_fraction"] == 0.008  # not the superseded 0.009 of the first record
    assert (f"| 0.8% (95% CI 0.64-0.99%) | {mem['ratio_quantiles']['0.5']:.3f} | {mem['nearest_distance']:.2f} |"
            in rows["otcfm, EMA"])
    assert f"| {gap['loss_gap']:.4g} ± {gap['loss_gap_se']:.2g} |" in rows["otcfm, EMA"]
    # The best FID of the same checkpoint: the latest dopri5 1e-5 record (3.622, not the superseded
    # 1.23, nor the test-reference 5.722); the held-out local loss of the re-evaluated test split.
    assert rows["otcfm, EMA"].endswith("| 3.62 | 0.45 ± 0.01 |")
    assert rows["otcfm, raw net"].endswith("| - | - |")  # no FID nor locality of the raw net
    assert rows["otcfm_local_1e0"].endswith("| - | 0.12 |")
    assert generalization_results.generalization_table([REPO / "tests/data/runs/icfm"]) == ""


def test_ratio_histograms_are_densities_and_gap_curves_follow_the_records():
    runs = [REPO / "tests/data/runs/otcfm", REPO / "tests/data/runs/otcfm_local_1e0"]
    histograms = generalization_results.ratio_histograms(runs)
    assert [(c.run, c.series) for c in histograms] == [
        (run, series) for run in ("otcfm, EMA", "otcfm, raw net", "otcfm_local_1e0")
        for series in ("samples", "test images")]
    records = {"otcfm, raw net": parse(runs[0] / "generalization.jsonl")[-1],
               "otcfm_local_1e0": parse(runs[1] / "generalization.jsonl")[-1]}
    for curve in histograms:
        assert len(curve.x) == 50 and curve.x[0] == pytest.approx(0.01) and sum(curve.y) / 50 == pytest.approx(1)
        if curve.run in records and curve.series == "samples":
            counts = records[curve.run]["memorization"]["ratio_histogram"]
            assert curve.y == pytest.approx([50 * c / sum(counts) for c in counts])
    gaps = {c.run: c for c in generalization_results.gap_curves(runs)}
    for run, record in records.items():
        assert (gaps[run].x, gaps[run].y, gaps[run].error) == (
            record["loss_gap"]["times"], record["loss_gap"]["gap"], record["loss_gap"]["gap_se"])


# ------------------------------------------------------------------------ what the figures show


def draw_in_process(monkeypatch, out, run_dirs):
    """{file name: Figure}: plot_results.main run in this process on `run_dirs`, each figure captured
    as it is saved (before it is closed); the plot flags parsed for it, then unparsed."""
    import matplotlib.figure
    from absl import flags

    import plot_results

    figures = {}
    savefig = matplotlib.figure.Figure.savefig

    def capturing_savefig(fig, path, *args, **kwargs):
        figures[Path(path).name] = fig
        return savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capturing_savefig)
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["plot_results.py", f"--out={out}", "--dpi=20"])
    try:
        plot_results.main(["plot_results.py", *map(str, run_dirs)])
    finally:
        flags.FLAGS.unparse_flags()
    return figures


@pytest.fixture
def drawn(tmp_path, monkeypatch):
    """{file name: Figure} of the fixture runs (no conditional checkpoint among them)."""
    with pytest.warns(UserWarning, match="torn write"):
        figures = draw_in_process(monkeypatch, tmp_path, RUNS)
    assert set(figures) == {"training_curves.png", "fid_vs_nfe.png", "generalization.png", "memorizing_field.png"}
    return figures


def line_points(line):
    return list(zip(map(float, line.get_xdata()), map(float, line.get_ydata())))


def test_training_curves_draw_each_metrics_file_as_recorded(drawn):
    """A panel per metric titled with its name over `step`; in it one line per metrics file holding
    that metric, whose points are the file's (step, value) records (start lines and nulls left
    out); the figure's legend names every run/file once, in the colour of its lines."""
    fig = drawn["training_curves.png"]
    legend, = fig.legends
    labels = [text.get_text() for text in legend.get_texts()]
    files = sorted(p for run in RUNS for p in run.glob("*metrics.jsonl"))
    assert sorted(labels) == sorted(f"{p.parent.name}/{p.name}" for p in files)
    colour_of = {label: handle.get_color() for label, handle in zip(labels, legend.legend_handles)}
    assert len(set(colour_of.values())) == len(labels)  # one colour per file
    file_of = {colour: REPO / "tests/data/runs" / label for label, colour in colour_of.items()}

    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["loss", "loss_fm", "local_loss", "grad_norm", "fid"]
    assert all(not ax.lines for ax in fig.axes if not ax.get_visible())  # the spare panel is empty
    for ax in panels:
        metric = ax.get_title()
        assert ax.get_xlabel() == "step"
        holding = [p for p in files if any(r.get(metric) is not None for r in parse(p) if "event" not in r)]
        assert sorted(file_of[line.get_color()] for line in ax.lines) == holding
        for line in ax.lines:
            records = parse(file_of[line.get_color()])
            expected = [(r["step"], r[metric]) for r in records if "event" not in r and r.get(metric) is not None]
            assert line_points(line) == expected and len(expected) > 1


def test_fid_against_nfe_draws_each_evaluation_and_solver_as_recorded(drawn):
    """One log-log panel, FID over mean NFE; a line per evaluation and solver, labelled so in the
    legend, through the latest scored record of each setting sorted by NFE; a colour per run and a
    line style and marker per solver."""
    fig = drawn["fid_vs_nfe.png"]
    ax, = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("mean NFE per sample", "FID", "FID against NFE")
    assert ax.get_xscale() == ax.get_yscale() == "log"
    otcfm, icfm = REPO / "tests/data/runs/otcfm", REPO / "tests/data/runs/icfm"
    groups = {"icfm": latest_scored(icfm), "otcfm, vs train": latest_scored(otcfm, fid_split="train"),
              "otcfm, vs test": latest_scored(otcfm, fid_split="test")}
    expected = {}
    for group, records in groups.items():
        for solver in {r["integration_method"] for r in records}:
            expected[f"{group}: {solver}"] = sorted((r["mean_nfe"], r["fid"]) for r in records
                                                   if r["integration_method"] == solver)
    assert {line.get_label(): line_points(line) for line in ax.lines} == expected
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [line.get_label() for line in ax.lines]
    runs = {line.get_label().split(": ")[0]: line.get_color() for line in ax.lines}
    styles = {line.get_label().split(": ")[1]: (line.get_linestyle(), line.get_marker()) for line in ax.lines}
    for line in ax.lines:
        run, solver = line.get_label().split(": ")
        assert line.get_color() == runs[run] and (line.get_linestyle(), line.get_marker()) == styles[solver]
    assert len(set(runs.values())) == len(runs) == 3 and len(set(styles.values())) == len(styles) > 1


def assert_points(drawn_points, expected_points):
    """The same (x, y) points, to float rounding."""
    drawn_points, expected_points = np.asarray(drawn_points), np.asarray(expected_points)
    assert drawn_points.shape == expected_points.shape and np.allclose(drawn_points, expected_points, rtol=1e-12, atol=0)


def latest_generalization(run_dir, use_ema=True):
    return [r for r in parse(run_dir / "generalization.jsonl") if r["use_ema"] == use_ema][-1]


def test_generalization_figure_draws_the_histograms_and_gaps_as_recorded(drawn):
    """Left: for every evaluation, a step line per series at the bin centres with the recorded counts
    as a density: samples from its `memorization` section, solid; test images from its
    `memorization_test` section, dashed; the 1/3 line; log density. Right: for every evaluation,
    the recorded gap and its errors against t. A colour per evaluation, the same in both panels."""
    left, right = drawn["generalization.png"].axes
    assert (left.get_xlabel(), left.get_yscale(), left.get_title()) == (
        "d1 / d2 (nearest / second-nearest training image)", "log", "nearest-neighbour ratio")
    otcfm, local = REPO / "tests/data/runs/otcfm", REPO / "tests/data/runs/otcfm_local_1e0"
    records = {"otcfm, EMA": latest_generalization(otcfm), "otcfm, raw net": latest_generalization(otcfm, use_ema=False),
               "otcfm_local_1e0": latest_generalization(local)}
    series = {"samples": ("memorization", "-"), "test images": ("memorization_test", "--")}
    histograms = [ln for ln in left.lines if not ln.get_label().startswith("1/3")]
    assert sorted(ln.get_label() for ln in histograms) == sorted(f"{run}: {name}" for run in records for name in series)
    colour = {}
    for line in histograms:
        run, name = line.get_label().split(": ")
        section, linestyle = series[name]
        counts = records[run][section]["ratio_histogram"]
        assert_points(line_points(line), [((i + 0.5) / len(counts), len(counts) * c / sum(counts))
                                          for i, c in enumerate(counts)])
        assert (line.get_drawstyle(), line.get_linestyle()) == ("steps-mid", linestyle)
        assert to_rgba(colour.setdefault(run, line.get_color())) == to_rgba(line.get_color())
    assert len({to_rgba(c) for c in colour.values()}) == len(records)
    assert [ln.get_xdata()[0] for ln in left.lines if ln.get_label().startswith("1/3")] == [1 / 3]
    assert {t.get_text() for t in left.get_legend().get_texts()} == {
        "1/3: memorized below", *(ln.get_label() for ln in histograms)}
    assert (right.get_xlabel(), right.get_ylabel()) == ("t", "loss_fm(test) - loss_fm(train)")
    gaps = {c.get_label(): c for c in right.containers}
    assert set(gaps) == set(records) and len(right.containers) == len(records)
    for run, record in records.items():
        gap = record["loss_gap"]
        drawn_line = gaps[run].lines[0]
        assert_points(line_points(drawn_line), list(zip(gap["times"], gap["gap"])))
        segments = gaps[run].lines[2][0].get_segments()  # the error bars: gap ± se at each t
        assert_points([(s[0][0], s[0][1], s[1][1]) for s in segments],
                      [(t, g - e, g + e) for t, g, e in zip(gap["times"], gap["gap"], gap["gap_se"])])
        assert to_rgba(drawn_line.get_color()) == to_rgba(colour[run])


def test_memorizing_field_figure_draws_each_runs_distance_to_vstar_as_recorded(drawn):
    """A line per evaluation and point set through the recorded (t, distance); a colour per run, solid
    on the net's own trajectories and dashed on test-image paths; evaluations without the section
    draw nothing."""
    ax, = drawn["memorizing_field.png"].axes
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == (
        "t", "E|v - v*|^2 / E|v*|^2", "distance to the memorizing field")
    expected = {}
    for run_dir, label in ((REPO / "tests/data/runs/otcfm", "otcfm, EMA"),
                           (REPO / "tests/data/runs/otcfm_local_1e0", "otcfm_local_1e0")):
        section = latest_generalization(run_dir)["memorizing_field"]
        for key, series in (("trajectories", "own trajectories"), ("test_paths", "test-image paths")):
            expected[f"{label}: {series}"] = list(zip(section["times"], section[key]["distance"]))
    drawn_lines = {line.get_label(): line_points(line) for line in ax.lines}
    assert set(drawn_lines) == set(expected)
    for label, points in expected.items():
        assert_points(drawn_lines[label], points)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [line.get_label() for line in ax.lines]
    for line in ax.lines:
        run, series = line.get_label().split(": ")
        assert line.get_linestyle() == ("-" if series == "own trajectories" else "--")
    colours = {line.get_label().split(": ")[0]: line.get_color() for line in ax.lines}
    assert len(set(colours.values())) == 2


@pytest.mark.filterwarnings("ignore:.*torn write")
def test_field_distance_columns_of_the_generalization_table():
    rows = {row.split(" | ")[0].lstrip("| "): row for row in generalization_results.generalization_table(RUNS).splitlines()[2:]}
    section = latest_generalization(REPO / "tests/data/runs/otcfm")["memorizing_field"]
    assert (f"| {section['trajectories']['overall']:.3f} | {section['test_paths']['overall']:.3f} | "
            f"{generalization_results.format_memorized(section['sampler'])} | 3.62 |") in rows["otcfm, EMA"]
    assert "| - | - | - | - | - |" in rows["otcfm, raw net"]  # no distance, sampler, FID or locality


def test_the_report_reads_the_evaluations_own_constants():
    """results.py's locality terms and memorization threshold are the evaluations' own objects, not copies."""
    from cfm.evaluation import generalization, locality

    assert results.LOCALITY_TERMS is locality.TERMS
    assert results.MEMORIZATION_RATIO is generalization.MEMORIZATION_RATIO


# ------------------------------------------------------------------ conditional checkpoints


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def per_class_section(rng, classes):
    """A memorization section's per-class numbers as compute_generalization.py writes them, from random counts."""
    section = {}
    for c in classes:
        num = int(rng.integers(20, 200))
        rates = {}
        for quantity in ("memorized", "nearest_class"):
            fraction = int(rng.integers(0, num + 1)) / num
            rates[f"{quantity}_fraction"] = fraction
            rates[f"{quantity}_ci95"] = list(generalization_results.wilson_interval(fraction, num))
        section[str(c)] = {"num": num, **rates}
    return {"per_class": section}


@pytest.fixture
def conditional_runs(tmp_path):
    """Two run folders of conditional checkpoints, with synthetic records (seeded random numbers) as
    compute_fid.py and compute_generalization.py write them: guidance sweeps written out of order with
    one scale scored twice, two labels in one folder, KID in one folder only, an unguided record
    beside them; per-class memorization of the samples and the test images."""
    rng = np.random.default_rng(0)
    runs = [tmp_path / "runs" / "otcfm_class", tmp_path / "runs" / "otcfm_cluster"]

    def fid_record(scale, label=None, kid=True):
        record = {"checkpoint": "c.pt", "step": 1, "model": "otcfm", "use_ema": True, "integration_method": "euler",
                  "integration_steps": 100, "mean_nfe": 200.0, "num_gen": 1000, "fid_split": "train",
                  "condition": "class", "guidance_scale": scale, "label": label, "fid": float(rng.uniform(3, 30))}
        if kid:
            record.update(kid=float(rng.uniform(0, 0.02)), kid_std=float(rng.uniform(0, 1e-3)))
        return record

    write_jsonl(runs[0] / "fid.jsonl", [
        {"checkpoint": "c.pt", "use_ema": True, "integration_method": "euler", "integration_steps": 100,
         "mean_nfe": 100.0, "num_gen": 1000, "fid_split": "train", "fid": 9.0},  # no guidance_scale: not a point of a guidance curve
        *(fid_record(w) for w in (3.0, 0.0, 1.0, 2.0)), fid_record(1.0),
        *(fid_record(w, label=3) for w in (2.0, 0.5))])
    write_jsonl(runs[1] / "fid.jsonl", [fid_record(w, kid=False) for w in (1.5, 0.5, 4.0)])
    for run, classes in zip(runs, (range(10), (2, 7))):
        write_jsonl(run / "generalization.jsonl", [
            {"checkpoint": "c.pt", "step": 1, "model": "otcfm", "use_ema": True, "condition": "class",
             "guidance_scale": 1.0, "label": None, "seed": 0,
             "memorization": {"num": 1000, **per_class_section(rng, classes)},
             "memorization_test": {"num": 1000, **per_class_section(rng, range(10))}}])
    return runs


def expected_guidance_points(run_dir):
    """{curve label: {series: [(w, value, error)]}} from the records read here: per label the latest
    record of each scale, sorted by scale."""
    latest = {}
    for record in parse(run_dir / "fid.jsonl"):
        if "guidance_scale" in record:
            latest.setdefault(record["label"], {})[record["guidance_scale"]] = record
    out = {}
    for label, by_scale in latest.items():
        name = run_dir.name + ("" if len(latest) == 1 else ", balanced labels" if label is None else f", label {label}")
        rows = [by_scale[w] for w in sorted(by_scale)]
        out[name] = {"fid": [(r["guidance_scale"], r["fid"], None) for r in rows]}
        if all("kid" in r for r in rows):
            out[name]["kid"] = [(r["guidance_scale"], r["kid"], r["kid_std"]) for r in rows]
    return out


def test_fid_and_kid_against_guidance_scale_are_drawn_as_recorded(conditional_runs, tmp_path, monkeypatch):
    """FID in one panel and KID (± kid_std) in another, against w: a line per run and label through the
    latest record of each scale, sorted by scale; records without a scale stay out."""
    figures = draw_in_process(monkeypatch, tmp_path / "out", conditional_runs)
    fid_ax, kid_ax = figures["fid_vs_guidance.png"].axes
    assert (fid_ax.get_xlabel(), fid_ax.get_ylabel(), kid_ax.get_ylabel()) == ("guidance scale w", "FID", "KID")
    expected = {}
    for run_dir in conditional_runs:
        expected.update(expected_guidance_points(run_dir))
    assert len(expected) == 3
    for ax, series in ((fid_ax, "fid"), (kid_ax, "kid")):
        curves = {c.get_label(): c for c in ax.containers}
        wanted = {name: points[series] for name, points in expected.items() if series in points}
        assert set(curves) == set(wanted) and len(ax.containers) == len(wanted)
        for name, points in wanted.items():
            assert_points(line_points(curves[name].lines[0]), [(w, value) for w, value, _ in points])
            if series == "kid":
                segments = curves[name].lines[2][0].get_segments()
                assert_points([(s[0][0], s[0][1], s[1][1]) for s in segments],
                              [(w, value - e, value + e) for w, value, e in points])
    assert [w for w, _, _ in expected["otcfm_class, balanced labels"]["fid"]] == [0.0, 1.0, 2.0, 3.0]
    # FID against NFE and the best-FID table keep each scale and label apart (one solver setting, many w).
    table = results.best_fid_table(conditional_runs[:1])
    for record in parse(conditional_runs[0] / "fid.jsonl")[1:]:
        label = "balanced labels" if record["label"] is None else f"label {record['label']}"
        assert f"| otcfm_class, w={record['guidance_scale']:g}, {label} | euler | " in table
    assert len(table.splitlines()) == 2 + 1 + 4 + 2  # the unguided record, 4 balanced scales, 2 of label 3
    # The scale scored twice is drawn with its latest value.
    first = [r["fid"] for r in parse(conditional_runs[0] / "fid.jsonl") if r.get("guidance_scale") == 1.0]
    assert dict(line_points(next(c for c in fid_ax.containers if c.get_label().endswith("balanced labels"))
                            .lines[0]))[1.0] == first[-1] != first[0]


def test_memorization_per_class_is_drawn_with_its_wilson_intervals(conditional_runs, tmp_path, monkeypatch):
    """A panel for the fraction memorized and one for the nearest-class fraction: per run a line for the
    samples (solid) and the test images (dashed) through each class's recorded fraction, error bars
    from its recorded 95% Wilson interval."""
    figures = draw_in_process(monkeypatch, tmp_path / "out", conditional_runs)
    axes = figures["memorization_per_class.png"].axes
    assert [ax.get_ylabel() for ax in axes] == ["fraction memorized (d1 < d2 / 3)", "nearest training image of the class"]
    for ax, quantity in zip(axes, ("memorized", "nearest_class")):
        expected = {}
        for run_dir in conditional_runs:
            record = parse(run_dir / "generalization.jsonl")[-1]
            for section, series in (("memorization", "samples"), ("memorization_test", "test images")):
                rows = sorted(record[section]["per_class"].items(), key=lambda item: int(item[0]))
                expected[f"{run_dir.name}: {series}"] = [(int(c), row[f"{quantity}_fraction"], *row[f"{quantity}_ci95"])
                                                         for c, row in rows]
        curves = {c.get_label(): c for c in ax.containers}
        assert set(curves) == set(expected) and len(ax.containers) == 4
        for name, points in expected.items():
            line = curves[name].lines[0]
            assert_points(line_points(line), [(c, y) for c, y, _, _ in points])
            assert line.get_linestyle() == ("-" if name.endswith("samples") else "--")
            segments = curves[name].lines[2][0].get_segments()
            assert_points([(s[0][0], s[0][1], s[1][1]) for s in segments], [(c, low, high) for c, _, low, high in points])
