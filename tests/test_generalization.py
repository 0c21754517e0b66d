"""Generalization (generalization.py, compute_generalization.py): the flip-aware nearest-neighbour
search against brute force, the memorization criterion on copies and on noise, chunking, the
train/test loss gap against the written-out loss, and the script end to end on fake CIFAR-10, on one
process and on two gloo processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SUBPROCESS_TIMEOUT_S, TINY_UNET_CONFIG, random_unet, save_tiny_checkpoint
from PIL import Image

from cfm.evaluation import generalization
from cfm.evaluation.sampling import generate_samples, noise
from cfm.io.cifar10 import load_cifar10, to_model_range, to_uint8
from cfm.io.run_files import read_jsonl
from cfm.method.flow_matching import make_matcher

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2")
# A tiny evaluation: 6 samples and 6 test images in search batches of 4 (two batches: one per rank
# under torchrun), 8 loss images in batches of 4 at 3 times; the distance to v* on 3 points at 2 times,
# 4 Euler steps, 3 samples of the v*-driven sampler, v* sums over chunks of 7 training images.
TINY = ["--num_gen=6", "--batch_size_fid=4", "--integration_method=euler", "--integration_steps=2", "--num_test=6",
        "--loss_images=8", "--batch_size=4", "--num_times=3", "--grid_size=3", "--search_chunk=7", "--seed=2",
        "--field_points=3", "--field_times=2", "--field_steps=4", "--field_samples=3", "--field_chunk=7"]

pytestmark = pytest.mark.usefixtures("one_thread")


def random_images(n, seed):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def brute_force(queries, references):
    """(distances [Q, 2], indices [Q, 2], flipped [Q, 2]) written out: for each query and each
    training image, the smaller of the distances to the image and to its mirror, then the two
    smallest over images; RMS pixel difference (numpy, float64)."""
    x = queries.double().flatten(1).numpy()
    out = ([], [], [])
    for q in x:
        per_image = []
        for i, y in enumerate(references.double()):
            plain = np.linalg.norm(q - y.flatten().numpy())
            mirror = np.linalg.norm(q - y.flip(-1).flatten().numpy())
            per_image.append((min(plain, mirror), i, mirror < plain))
        nearest = sorted(per_image)[:2]
        for k, values in enumerate(zip(*nearest)):
            out[k].append(values)
    distance, index, flipped = (np.array(v) for v in out)
    return distance / np.sqrt(x.shape[1]), index, flipped


def noisy(images, seed, amplitude=20):
    """uint8 images plus seeded uniform integer noise in [-amplitude, amplitude], clipped."""
    g = torch.Generator().manual_seed(seed)
    shifts = torch.randint(-amplitude, amplitude + 1, images.shape, generator=g)
    return (images.int() + shifts).clamp(0, 255).to(torch.uint8)


def test_search_equals_brute_force_flips_included():
    references = random_images(40, 0)
    # Random images, and noisy copies of training images and of their mirrors (where the flip decides).
    queries = torch.cat([random_images(10, 1), noisy(references[:8], 2), noisy(references[8:16].flip(-1), 3)])
    found = generalization.FlipNeighbours(references, chunk_size=9).search(queries)
    distance, index, flipped = brute_force(queries, references)
    assert np.array_equal(found.index.numpy(), index)
    assert np.array_equal(found.flipped.numpy(), flipped) and flipped[18:, 0].all() and not flipped[10:18, 0].any()
    np.testing.assert_allclose(found.distance.numpy(), distance, rtol=1e-12)
    np.testing.assert_allclose(found.ratio.numpy(), distance[:, 0] / distance[:, 1], rtol=1e-12)


def test_copies_and_mirror_copies_are_memorized_and_gaussian_images_are_not():
    g = torch.Generator().manual_seed(0)
    references = random_images(30, 4)
    # A nearly symmetric training image: its mirror differs from it by a few grey levels, so a
    # search over the 60 images and mirrors as separate points would find the mirror second and
    # call a near copy of it novel.
    half = references[0, :, :, :16]
    references[0] = torch.cat([half, half.flip(-1)], -1)
    references[0, 0, 0, 0] += 3
    near_copy = noisy(references[0], 1, amplitude=2)
    gaussian = to_uint8(torch.randn(12, 3, 32, 32, generator=g))
    queries = torch.cat([references[5:6], references[9:10].flip(-1), near_copy[None], gaussian])
    found = generalization.FlipNeighbours(references).search(queries)
    assert found.memorized.tolist() == [True, True, True] + [False] * 12
    assert found.index[:3, 0].tolist() == [5, 9, 0] and found.flipped[:2, 0].tolist() == [False, True]
    assert found.distance[:2, 0].tolist() == [0, 0] and (found.distance[:3, 1] > 40).all()
    assert (found.ratio[3:] > 0.9).all()
    # The grid shows each neighbour in the orientation that matched: the two exact copies (ratio 0,
    # the most memorized) sit over themselves.
    grid = generalization.most_memorized_grid(queries, found, references, 3)
    assert grid.shape == (9, 3, 32, 32) and torch.equal(grid[3:5], grid[:2])
    summary = generalization.memorization_summary(found)
    assert summary["num"] == 15 and summary["memorized_fraction"] == pytest.approx(3 / 15)
    assert summary["memorized_fraction_se"] == pytest.approx(np.sqrt(0.2 * 0.8 / 15))
    assert summary["ratio_quantiles"]["0.5"] == pytest.approx(np.quantile(found.ratio.numpy(), 0.5))
    assert summary["ratio_histogram"][0] == 3 and sum(summary["ratio_histogram"]) == 15
    assert summary["nearest_distance"] == pytest.approx(found.distance[:, 0].mean().item())


def test_the_memorization_threshold_is_one_third_on_both_sides():
    """d_(1) < d_(2) / 3 is memorized (Yoon et al. 2023; Gu et al. 2023): ratios just below 1/3 count,
    1/3 itself and ratios up to 1/2 do not (a threshold of 1/2 would count the last three); the
    summary's fraction uses the same rule."""
    second = torch.full((6,), 30.0, dtype=torch.float64)
    nearest = second * torch.tensor([0.2, 1 / 3 - 1e-9, 1 / 3, 0.34, 0.45, 0.9], dtype=torch.float64)
    found = generalization.Neighbours(torch.stack([nearest, second], 1), torch.zeros(6, 2, dtype=torch.int64),
                                      torch.zeros(6, 2, dtype=torch.bool))
    assert found.memorized.tolist() == [True, True, False, False, False, False]
    assert generalization.memorization_summary(found)["memorized_fraction"] == pytest.approx(2 / 6)


def test_the_memorized_fraction_is_reported_with_the_wilson_interval_of_scipy():
    """format_memorized: the 95% Wilson interval, equal to scipy's on the same counts; 0 of 64
    memorized is 0-5.7%, not '0 ± 0%'."""
    from scipy.stats import binomtest

    from cfm.evaluation import generalization_results

    for memorized, num in ((0, 64), (3, 15), (80, 10000), (64, 64)):
        expected = binomtest(memorized, num).proportion_ci(confidence_level=0.95, method="wilson")
        assert generalization.wilson_interval(memorized / num, num) == pytest.approx((expected.low, expected.high), abs=1e-12)
    assert generalization_results.format_memorized({"memorized_fraction": 0.0, "num": 64}) == "0% (95% CI 0-5.7%)"


def test_chunked_equals_unchunked():
    references, queries = random_images(25, 5), random_images(12, 6)
    queries[3] = references[24].flip(-1)  # the last image, alone in the last chunk of 3
    whole = generalization.FlipNeighbours(references, chunk_size=1000).search(queries)
    for chunk in (1, 3, 7):
        chunked = generalization.FlipNeighbours(references, chunk_size=chunk).search(queries)
        for name in ("distance", "index", "flipped"):
            assert torch.equal(getattr(chunked, name), getattr(whole, name)), (chunk, name)
    assert whole.index[3, 0] == 24 and whole.flipped[3, 0]


def test_the_gap_is_the_written_out_loss_difference_and_zero_on_the_same_images():
    train, test = random_images(8, 7), random_images(8, 8)
    times = generalization.loss_times(3)
    assert torch.allclose(times, torch.tensor([1 / 6, 1 / 2, 5 / 6]))
    # v(t, x) = x on the icfm path (sigma 0): v - u = t x1 + (1 - t) x0 - (x1 - x0) = (t - 1) x1 + (2 - t) x0.
    gap = generalization.loss_gap(lambda t, x: x, make_matcher("icfm"), train, test, times, batch_size=4, seed=3)
    for b in range(2):
        x0 = noise(range(4 * b, 4 * b + 4), seed=3 + generalization.LOSS_SEED_OFFSET).double()
        for k, t in enumerate(times.double()):
            for images, values in ((train, gap.train), (test, gap.test)):
                x1 = to_model_range(images[4 * b:4 * b + 4]).double()
                expected = ((t - 1) * x1 + (2 - t) * x0).square().mean().item()
                assert values[b, k].item() == pytest.approx(expected, rel=1e-5)
    summary = gap.summary()
    differences = (gap.test - gap.train).numpy()
    assert summary["gap"] == pytest.approx(differences.mean(0).tolist())
    assert summary["gap_se"] == pytest.approx((differences.std(0, ddof=1) / np.sqrt(2)).tolist())
    assert summary["loss_gap"] == pytest.approx(differences.mean())
    assert summary["loss_gap_se"] == pytest.approx(differences.mean(1).std(ddof=1) / np.sqrt(2))
    assert abs(summary["loss_gap"]) > 1e-3
    # The same images as train and test: the same noise, times and OT draws, hence a gap of exactly 0
    # (otcfm with sigma > 0 draws a pairing and eps from the keyed generators).
    net = random_unet(TINY_UNET_CONFIG, 0).eval()
    same = generalization.loss_gap(net, make_matcher("otcfm", 0.1), train, train.clone(), times, batch_size=4, seed=3)
    assert torch.equal(same.train, same.test) and (same.train > 0.1).all()
    assert same.summary()["gap"] == [0.0] * 3


def test_one_seed_scores_every_checkpoint_on_the_same_inputs():
    """Two nets see the same loss-gap inputs at the same seed, other inputs at another seed."""
    train_images, test_images = random_images(20, 9), random_images(12, 10)

    def inputs(seed, scale):
        calls = []

        def field(t, x):
            calls.append(x.clone())
            return scale * x

        train, test = generalization.loss_gap_images(train_images, test_images, 8, seed)
        generalization.loss_gap(field, make_matcher("otcfm", 0.1), train, test, generalization.loss_times(2), 4, seed)
        return torch.stack(calls)

    first = inputs(0, 1.0)
    assert first.shape == (2 * 2 * 2, 4, 3, 32, 32)  # batches x splits x times
    assert torch.equal(first, inputs(0, 2.0)) and not torch.equal(first, inputs(1, 1.0))


def run_cli(cwd, args, launcher=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *launcher, str(REPO / "compute_generalization.py"), *args, "--device=cpu",
                           "--quiet"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, fake_cifar):
    """compute_generalization.py on one process, on a tiny icfm checkpoint (sigma 0.1) and the fake
    CIFAR-10: (checkpoint path, EMA net, its record, the process)."""
    folder = tmp_path_factory.mktemp("one")
    path, _, ema = save_tiny_checkpoint(folder / "icfm" / "icfm_cifar10_weights_step_7.pt", 7,
                                        flags={"model": "icfm", "sigma": 0.1, "ot_pairing": "replacement"})
    proc = run_cli(folder, [f"--checkpoint={path}", f"--data_dir={fake_cifar[0]}", *TINY])
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(path.parent / "generalization.jsonl")
    assert len(records) == 1
    return path, ema.eval(), records[0], proc


def without_timing(record):
    """A record without what differs between runs of the same evaluation (times, provenance, world)."""
    drop = {"seconds", "provenance", "world_size"}
    return {k: ({kk: vv for kk, vv in v.items() if kk != "seconds"} if isinstance(v, dict) else v)
            for k, v in record.items() if k not in drop}


def test_the_script_reports_the_library_numbers_and_the_grid(evaluated, fake_cifar):
    path, ema, record, proc = evaluated
    # An unconditional checkpoint's record has the keys it had before conditioning existed.
    assert not {"condition", "guidance_scale", "label"} & set(record) and "net_label" not in record["memorizing_field"]
    train = torch.from_numpy(fake_cifar[1])
    test, _ = load_cifar10(fake_cifar[0], train=False)
    samples, mean_nfe = generate_samples(ema, 6, batch_size=4, method="euler", steps=2, seed=2)
    search = generalization.FlipNeighbours(train)
    found = search.search(samples)
    assert record["memorization"] == {
        "samples": "generated", "integration_method": "euler", "integration_steps": 2, "mean_nfe": mean_nfe,
        "batch_size_fid": 4, **generalization.memorization_summary(found),
        "grid": str(path.parent / f"{path.stem}_memorized.png"), "seconds": record["memorization"]["seconds"]}
    expected_test = generalization.memorization_summary(search.search(test[:6]))
    assert {k: v for k, v in record["memorization_test"].items() if k != "seconds"} == expected_test
    loss_train, loss_test = generalization.loss_gap_images(train, test, 8, seed=2)
    gap = generalization.loss_gap(ema, make_matcher("icfm", 0.1), loss_train, loss_test, generalization.loss_times(3),
                                  batch_size=4, seed=2)
    expected_gap = {"images": 8, "batch_size": 4, **gap.summary()}
    assert set(record["loss_gap"]) == {*expected_gap, "seconds"} and gap.summary()["num_batches"] == 2
    for name, value in expected_gap.items():
        assert record["loss_gap"][name] == pytest.approx(value, rel=1e-6), name
    # The grid: three rows of 3 tiles (torchvision's 2-pixel padding): the most memorized samples over
    # their nearest and second-nearest training images.
    expected = generalization.most_memorized_grid(samples, found, train, 3)
    with Image.open(record["memorization"]["grid"]) as image:
        pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    assert pixels.shape == (3, 2 + 3 * 34, 2 + 3 * 34)
    for tile in range(9):
        row, column = divmod(tile, 3)
        assert torch.equal(pixels[:, 2 + 34 * row:34 * (row + 1), 2 + 34 * column:34 * (column + 1)], expected[tile])
    assert proc.stdout.strip().splitlines()[-1].endswith(f"appended to {path.parent / 'generalization.jsonl'}")


def test_the_script_reports_the_library_distance_to_vstar_and_the_vstar_sampler(evaluated, fake_cifar):
    """The memorizing_field section: the distance of the EMA net to v* (icfm, sigma 0.1: the
    checkpoint's path) on 3 test-image paths and 3 of its own trajectories at the loss gap's times,
    and the memorization numbers of 3 samples of the v*-driven sampler, as the library computes them."""
    from cfm.evaluation import memorizing_field

    _, ema, record, proc = evaluated
    train = torch.from_numpy(fake_cifar[1])
    test, _ = load_cifar10(fake_cifar[0], train=False)
    field = memorizing_field.MemorizingField(train, make_matcher("icfm", 0.1), chunk_size=7)
    times = generalization.loss_times(2).tolist()
    section = record["memorizing_field"]
    assert {k: section[k] for k in ("vstar_model", "vstar_sigma", "vstar_is_minimizer", "times", "points")} == {
        "vstar_model": "icfm", "vstar_sigma": 0.1, "vstar_is_minimizer": True, "times": times, "points": 3}
    point_sets = {"test_paths": memorizing_field.path_points(field.matcher, test[:3], times, seed=2),
                  "trajectories": memorizing_field.model_trajectory_points(ema, 3, times, 4, "euler", 4, seed=2)}
    for name, points in point_sets.items():
        distance = memorizing_field.field_distance(ema, field, points, times, batch_size=4)
        assert section[name]["distance"] == pytest.approx(distance.per_time, rel=1e-9), name
        assert section[name]["overall"] == pytest.approx(distance.overall, rel=1e-9), name
    samples = memorizing_field.memorizing_samples(field, noise(3, seed=2), 1e-3, "euler", 4)
    expected = generalization.memorization_summary(generalization.FlipNeighbours(train).search(to_uint8(samples.float())))
    assert section["sampler"] == {"num": 3, "steps": 4, "delta": 1e-3, **expected}
    # (With sigma 0.1 the sampler ends 0.1 from a training image per pixel, farther than the fake
    # images lie from each other: none counts as memorized here; test_memorizing_field's sampler test
    # checks that they land on training images.)
    assert f"distance to v* {section['test_paths']['overall']:.3f} on test paths" in proc.stdout


def test_the_record_head_is_that_of_the_other_evaluation_files(evaluated, fake_cifar, tmp_path):
    """compute_fid.py (--fid=False prints its record) and compute_locality.py on the same checkpoint
    start their records with the same fields and values."""
    path, _, record, _ = evaluated
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [f"--checkpoint={path}", f"--data_dir={fake_cifar[0]}", "--device=cpu", "--quiet"]
    fid = subprocess.run([sys.executable, str(REPO / "compute_fid.py"), *common, "--fid=False", "--num_gen=1",
                          "--integration_method=euler", "--integration_steps=1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=SUBPROCESS_TIMEOUT_S)
    assert fid.returncode == 0, fid.stderr
    locality = subprocess.run([sys.executable, str(REPO / "compute_locality.py"), *common, "--num_batches=1",
                               "--batch_size=2", "--num_subclasses=1"],
                              cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=SUBPROCESS_TIMEOUT_S)
    assert locality.returncode == 0, locality.stderr
    fid_record = json.loads(fid.stdout.strip().splitlines()[-1])
    locality_record = read_jsonl(path.parent / "locality.jsonl")[-1]
    head = {"checkpoint": str(path), "step": 7, "model": "icfm", "use_ema": True}
    assert list(record)[:5] == [*head, "sigma"] and {k: record[k] for k in head} == head and record["sigma"] == 0.1
    assert list(fid_record)[:4] == list(head) and {k: fid_record[k] for k in head} == head
    assert list(locality_record)[:5] == list(record)[:5] and {k: locality_record[k] for k in list(record)[:5]} == {
        k: record[k] for k in list(record)[:5]}


def test_two_gloo_processes_equal_one(evaluated, fake_cifar, tmp_path):
    path, _, record, _ = evaluated
    copy = tmp_path / "icfm" / path.name
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    proc = run_cli(tmp_path, [f"--checkpoint={copy}", f"--data_dir={fake_cifar[0]}", *TINY], launcher=TORCHRUN)
    assert proc.returncode == 0, proc.stderr
    (two,) = read_jsonl(copy.parent / "generalization.jsonl")  # rank 0 alone wrote
    assert two["world_size"] == 2 and record["world_size"] == 1
    expected = without_timing(record)
    expected["checkpoint"] = str(copy)
    expected["memorization"]["grid"] = str(copy.parent / f"{copy.stem}_memorized.png")
    # v* sums over each rank's half of the training set: the same up to float64 rounding.
    field, expected_field = two.pop("memorizing_field"), expected.pop("memorizing_field")
    assert without_timing(two) == expected
    for name in ("test_paths", "trajectories"):
        assert field.pop(name)["distance"] == pytest.approx(expected_field.pop(name)["distance"], rel=1e-12)
    del field["seconds"]
    assert field == expected_field  # the sampler's samples, rounded to uint8, and their numbers
    grid = Path(record["memorization"]["grid"]).read_bytes()
    assert (copy.parent / f"{copy.stem}_memorized.png").read_bytes() == grid


def test_a_samples_file_is_searched_instead_of_sampling(fake_cifar, tmp_path):
    """compute_fid.py's samples format: copies of training images and of their mirrors are memorized."""
    data_dir, images, _ = fake_cifar
    path, _, _ = save_tiny_checkpoint(tmp_path / "otcfm" / "otcfm_cifar10_weights_step_3.pt", 3)
    copies = np.concatenate([images[:3], images[10:13, :, :, ::-1]])  # NCHW; the last three mirrored
    np.savez(tmp_path / "s.npz", arr_0=copies.transpose(0, 2, 3, 1))
    proc = run_cli(tmp_path, [f"--checkpoint={path}", f"--data_dir={data_dir}", "--samples=s.npz", *TINY])
    assert proc.returncode == 0, proc.stderr
    memorization = read_jsonl(path.parent / "generalization.jsonl")[0]["memorization"]
    assert memorization["samples"] == "s.npz" and memorization["num"] == 6
    assert memorization["memorized_fraction"] == 1 and memorization["nearest_distance"] == 0


@pytest.mark.parametrize("args, message", [
    (["--samples=missing.npz"], "cannot read --samples=missing.npz (FileNotFoundError: "),
    (["--num_test=21"], "--num_test=21 but the test split holds 20 images: pass at most 20."),
    (["--loss_images=3"], "--loss_images=3 must lie between --batch_size=4 and the 20 images both splits hold."),
])
def test_bad_input_is_one_sentence_and_nothing_is_written(fake_cifar, tmp_path, args, message):
    path, _, _ = save_tiny_checkpoint(tmp_path / "otcfm" / "otcfm_cifar10_weights_step_3.pt", 3)
    proc = run_cli(tmp_path, [f"--checkpoint={path}", f"--data_dir={fake_cifar[0]}", *TINY, *args])
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"compute_generalization.py: {message}")
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


# ------------------------------------------------------------------ label-conditioned checkpoints

def test_per_class_memorization_of_planted_training_images():
    """Training images planted as samples (copies, memorized) beside random images (not), each with a
    requested class, the copies some with their own class and some with another: per class the
    memorized fraction, the nearest-class fraction and their Wilson intervals equal those counted
    here from the brute-force search and scipy's interval."""
    from scipy.stats import binomtest

    train, train_labels = random_images(40, 14), torch.arange(40) % 10
    labels = train_labels.numpy()
    copies = [3, 14, 25, 36, 21, 32, 7, 18]  # classes 3, 4, 5, 6, 1, 2, 7, 8
    queries = torch.cat([train[copies], random_images(6, 11)])
    # The first five copies requested with their own class, the other three with another; the random images too.
    classes = torch.cat([train_labels[copies[:5]], (train_labels[copies[5:]] + 1) % 10,
                         torch.tensor([3, 3, 4, 4, 2, 2])])
    found = generalization.FlipNeighbours(train, chunk_size=30).search(queries)
    per_class = generalization.per_class_memorization(found, classes, train_labels)

    distance, index, _ = brute_force(queries, train)
    memorized = distance[:, 0] < distance[:, 1] / 3
    same = labels[index[:, 0]] == classes.numpy()
    assert memorized.tolist() == [True] * 8 + [False] * 6 and same[:8].tolist() == [True] * 5 + [False] * 3
    # The second-nearest images' classes would give other matches: the nearest one decides.
    assert not np.array_equal(labels[index[:, 1]] == classes.numpy(), same)

    def interval(hits):
        ci = binomtest(int(hits.sum()), len(hits)).proportion_ci(confidence_level=0.95, method="wilson")
        return pytest.approx([ci.low, ci.high], abs=1e-12)

    assert per_class["nearest_class_fraction"] == pytest.approx(same.mean())
    assert per_class["nearest_class_ci95"] == interval(same)
    assert sorted(per_class["per_class"], key=int) == [str(c) for c in sorted(set(classes.tolist()))]
    for key, row in per_class["per_class"].items():
        rows = classes.numpy() == int(key)
        assert row == {"num": int(rows.sum()),
                       "memorized_fraction": pytest.approx(memorized[rows].mean()),
                       "memorized_ci95": interval(memorized[rows]),
                       "nearest_class_fraction": pytest.approx(same[rows].mean()),
                       "nearest_class_ci95": interval(same[rows])}, key
    assert per_class["per_class"]["3"]["num"] == 4 and per_class["per_class"]["3"]["memorized_fraction"] == 0.5


def test_the_loss_gap_gives_each_row_its_images_label_through_ot_repairing():
    """With labels, the net is called as net(t, x, y), y the label of each row's image after otcfm's
    re-pairing (the field below adds y, so a wrong label changes the loss)."""
    train, test = random_images(8, 12), random_images(8, 13)
    train_labels, test_labels = torch.arange(8), torch.arange(8) + 10
    matcher, times = make_matcher("otcfm", 0.1), generalization.loss_times(2)
    gap = generalization.loss_gap(lambda t, x, y: x + y[:, None, None, None], matcher, train, test, times,
                                  batch_size=4, seed=3, labels=(train_labels, test_labels))
    for b in range(2):
        x0 = noise(range(4 * b, 4 * b + 4), seed=3 + generalization.LOSS_SEED_OFFSET)
        for k, t in enumerate(times.tolist()):
            for images, labels, values in ((train, train_labels, gap.train), (test, test_labels, gap.test)):
                rows = slice(4 * b, 4 * b + 4)
                sample = matcher.sample(x0, to_model_range(images[rows]), t=t,
                                        generator=generalization._path_generator(3, b, k))
                assert sample.index is not None
                y = labels[rows][sample.index].float()
                expected = (sample.xt + y[:, None, None, None] - sample.ut).square().mean().item()
                assert values[b, k].item() == pytest.approx(expected, rel=1e-6)


@pytest.fixture(scope="module")
def evaluated_conditional(tmp_path_factory, fake_cifar):
    """compute_generalization.py on a tiny class-conditioned icfm checkpoint (sigma 0.1), every sample
    of class 3 at guidance scale 2 (the fake test images' classes are 0, 1, 2, ...: not those of the
    samples): (checkpoint path, EMA net, its record, the process)."""
    from conftest import TINY_UNET_CONFIG

    folder = tmp_path_factory.mktemp("conditional")
    path, _, ema = save_tiny_checkpoint(folder / "icfm" / "icfm_cifar10_weights_step_9.pt", 9,
                                        config={**TINY_UNET_CONFIG, "num_classes": 10},
                                        flags={"model": "icfm", "sigma": 0.1, "ot_pairing": "replacement"},
                                        condition={"condition": "class", "num_classes": 10, "cond_drop_prob": 0.1})
    proc = run_cli(folder, [f"--checkpoint={path}", f"--data_dir={fake_cifar[0]}", *TINY, "--guidance_scale=2",
                            "--label=3"])
    assert proc.returncode == 0, proc.stderr
    (record,) = read_jsonl(path.parent / "generalization.jsonl")
    return path, ema.eval(), record, proc


def test_a_conditional_checkpoint_is_scored_per_class_with_its_labels(evaluated_conditional, fake_cifar):
    """The samples are the guided samples of label 3 at w = 2, and per class their numbers
    are the library's on them; the test images per their own class; the loss gap with each image's
    class; the distance to v* of the null-label field."""
    from cfm.evaluation import memorizing_field
    from cfm.method.guidance import Guidance, balanced_labels

    path, ema, record, proc = evaluated_conditional
    _, images, labels = fake_cifar
    train, train_labels = torch.from_numpy(images), torch.from_numpy(labels).long()
    test, test_labels = load_cifar10(fake_cifar[0], train=False)
    assert {k: record[k] for k in ("condition", "guidance_scale", "label")} == {
        "condition": "class", "guidance_scale": 2.0, "label": 3}
    requested = balanced_labels(6, 10, label=3)
    samples, mean_nfe = generate_samples(ema, 6, batch_size=4, method="euler", steps=2, seed=2,
                                         guidance=Guidance(requested, 2.0))
    assert mean_nfe == 4  # 2 Euler steps, both rows of each guided call
    search = generalization.FlipNeighbours(train)
    found = search.search(samples)
    expected = {**generalization.memorization_summary(found),
                **generalization.per_class_memorization(found, requested, train_labels)}
    assert {k: record["memorization"][k] for k in expected} == expected
    assert list(record["memorization"]["per_class"]) == ["3"]
    found_test = search.search(test[:6])
    assert sorted(record["memorization_test"]["per_class"], key=int) == [str(c) for c in range(6)]
    expected_test = {**generalization.memorization_summary(found_test),
                     **generalization.per_class_memorization(found_test, test_labels[:6], train_labels)}
    assert {k: v for k, v in record["memorization_test"].items() if k != "seconds"} == expected_test

    train_rows, test_rows = generalization.loss_gap_indices(len(train), len(test), 8, seed=2)
    gap = generalization.loss_gap(ema, make_matcher("icfm", 0.1), train[train_rows], test[test_rows],
                                  generalization.loss_times(3), batch_size=4, seed=2,
                                  labels=(train_labels[train_rows], test_labels[test_rows]))
    assert record["loss_gap"]["net_label"] == "class"
    for name, value in gap.summary().items():
        assert record["loss_gap"][name] == pytest.approx(value, rel=1e-6), name

    section = record["memorizing_field"]
    assert section["net_label"] == "null"
    times = generalization.loss_times(2).tolist()
    field = memorizing_field.MemorizingField(train, make_matcher("icfm", 0.1), chunk_size=7)
    null = lambda t, x: ema(t, x, torch.full((len(x),), 10))  # noqa: E731
    distance = memorizing_field.field_distance(null, field, memorizing_field.path_points(field.matcher, test[:3], times,
                                                                                       seed=2), times, batch_size=4)
    assert section["test_paths"]["distance"] == pytest.approx(distance.per_time, rel=1e-9)
    labelled = lambda t, x: ema(t, x, torch.zeros(len(x), dtype=torch.int64))  # noqa: E731
    other = memorizing_field.field_distance(labelled, field, memorizing_field.path_points(field.matcher, test[:3], times,
                                                                                        seed=2), times, batch_size=4)
    assert section["test_paths"]["distance"] != pytest.approx(other.per_time, rel=1e-3)  # the label shows
    mem = record["memorization"]
    assert f"requested class for {100 * mem['nearest_class_fraction']:.3g}% of the samples" in proc.stdout
