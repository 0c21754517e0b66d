"""compute_fid.py end to end in subprocesses (absl flags are process-global), on tiny checkpoints.

Each run goes through a small runner script that can patch the network away (urlopen raises) and
swap Inception for a stand-in extractor, so nothing is downloaded except from a local test server.
Results are compared with what the library computes in this process (one process, same seed).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_UNET_CONFIG as TINY_CONFIG
from conftest import SUBPROCESS_TIMEOUT_S, random_unet, save_tiny_checkpoint, stand_in_extractor, write_fake_cifar10

from cfm.evaluation import feature_metrics, fid
from cfm.evaluation.sampling import generate_samples, straightness
from cfm.io.cifar10 import load_cifar10
from cfm.io.run_files import read_jsonl
from cfm.method.nets import build_net_from_checkpoint
from cfm.method.unet import PAPER_CONFIG

REPO = Path(__file__).resolve().parents[1]
# The fields of an unconditional checkpoint's fid.jsonl record (fixed-step solver) as before guided sampling:
# they gain none for it, and the KID fields only with --kid.
RECORD_KEYS = {"checkpoint", "step", "model", "use_ema", "integration_method", "integration_steps", "mean_nfe", "num_gen",
               "batch_size_fid", "world_size", "seed", "fid", "seconds", "fid_split", "fid_stats", "fid_stats_source",
               "provenance"}
SAMPLING = ["--fid=False", "--num_gen=8", "--batch_size_fid=5", "--integration_method=euler", "--integration_steps=2"]

OFFLINE = """
import urllib.error, urllib.request
from pathlib import Path
from cfm.evaluation import feature_metrics, fid

def refuse(url, *args, **kwargs):
    raise urllib.error.URLError("offline (test)")

urllib.request.urlopen = refuse
fid.cleanfid_cache_path = lambda filename: Path("no-cache") / filename
"""



def stand_in(num_features=16):
    """Runner code that replaces Inception with conftest.stand_in_extractor(num_features)."""
    return f"""
from cfm.evaluation import feature_metrics, fid
from conftest import stand_in_extractor
fid.load_inception = lambda path, device="cpu": stand_in_extractor({num_features})
"""


STAND_IN = stand_in()


# Many small solves: one intra-op thread is faster on a busy 2-core machine (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def runner_script(tmp_path, patches=""):
    """A script that applies `patches` and then runs compute_fid.main (the repo and tests/ importable)."""
    runner = tmp_path / "run_compute_fid.py"
    runner.write_text(
        f"import sys\nsys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n{patches}\n"
        "from absl import app\nimport compute_fid\napp.run(compute_fid.main)\n"
    )
    return runner


def run_cli(tmp_path, args, patches="", env=None, launcher=()):
    """Run compute_fid.py (through `launcher`, e.g. torchrun) with `args`, one thread per process:
    two spinning OpenMP threads on a busy 2-core CI box are many times slower."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *launcher, str(runner_script(tmp_path, patches)), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """Our format: raw and EMA weights differ, the UNet config and step are stored."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("run") / "otcfm" / "otcfm_cifar10_weights_step_20.pt", 20)


def test_samples_npz_grid_and_seed(tmp_path, tiny_checkpoint):
    path, net, ema = tiny_checkpoint
    proc = run_cli(tmp_path, [f"--checkpoint={path}", *SAMPLING, "--save_samples=s.npz", "--grid=g.png", "--seed=3",
                              "--device=cpu", "--quiet"])
    assert proc.returncode == 0, proc.stderr
    assert "sampling" not in proc.stderr  # --quiet: no progress bar
    with np.load(tmp_path / "s.npz") as npz:
        samples = npz["arr_0"]
    assert samples.dtype == np.uint8 and samples.shape == (8, 32, 32, 3)
    # The CLI samples the EMA weights exactly as sampling.generate_samples does in this process with the
    # same seed (NCHW -> NHWC): same seed, same samples, across processes.
    expected, _ = generate_samples(ema, 8, batch_size=5, method="euler", steps=2, seed=3)
    raw, _ = generate_samples(net, 8, batch_size=5, method="euler", steps=2, seed=3)
    other_seed, _ = generate_samples(ema, 8, batch_size=5, method="euler", steps=2, seed=4)
    assert np.array_equal(samples, expected.permute(0, 2, 3, 1).numpy())
    assert not torch.equal(expected, raw) and not torch.equal(expected, other_seed)
    assert (tmp_path / "g.png").stat().st_size > 0
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["step"] == 20 and record["mean_nfe"] == 2 and record["fid"] is None
    assert not (path.parent / "fid.jsonl").exists()  # only FID results are logged there


def test_default_path_and_published_checkpoint_without_config(tmp_path):
    """A published-style checkpoint: `module.` prefixes, no unet_config -> paper UNet, --num_channel wide."""
    config = dict(PAPER_CONFIG, num_channels=32)
    state = {f"module.{k}": v for k, v in random_unet(config, 2).state_dict().items()}
    folder = tmp_path / "results" / "icfm"
    folder.mkdir(parents=True)
    torch.save({"net_model": state, "ema_model": state, "step": 400000}, folder / "icfm_cifar10_weights_step_400000.pt")
    proc = run_cli(tmp_path, ["--model=icfm", "--num_channel=32", *SAMPLING, "--save_samples=s.npz", "--device=cpu"])
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "s.npz") as npz:
        assert npz["arr_0"].shape == (8, 32, 32, 3)


def test_checkpoint_that_does_not_fit_is_one_line_and_exit_1(tmp_path, tiny_checkpoint):
    path, _, ema = tiny_checkpoint
    bare = tmp_path / "bare.pt"
    torch.save({"net_model": ema.state_dict(), "ema_model": ema.state_dict()}, bare)  # tiny weights, no config
    proc = run_cli(tmp_path, [f"--checkpoint={bare}", "--num_channel=32", *SAMPLING, "--device=cpu"])
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not fit this UNet" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("weights", ["ema_model", "net_model"])
def test_nan_weights_end_the_run_in_one_sentence_writing_nothing(weights, tmp_path):
    """A checkpoint whose evaluated weights hold a NaN (a diverged run): exit status 1, one line on
    stderr, and no samples, no grid and no fid.jsonl line, although FID could be computed."""
    path, _, _ = save_tiny_checkpoint(tmp_path / "run" / "otcfm" / "otcfm_cifar10_weights_step_20.pt", 20)
    ckpt = torch.load(path, weights_only=True)
    ckpt[weights]["out.2.bias"][1] = float("nan")
    torch.save(ckpt, path)
    results = path.parent / "fid.jsonl"
    results.write_text('{"fid": 3.5, "step": 10}\n')  # an earlier evaluation's line, to stay alone
    flags, _ = fid_files(tmp_path, 4)
    args = [f"--checkpoint={path}", "--num_gen=8", "--batch_size_fid=4", "--integration_method=euler",
            "--integration_steps=2", "--save_samples=s.npz", "--grid=g.png", "--device=cpu", *flags]
    proc = run_cli(tmp_path, [*args, f"--use_ema={weights == 'ema_model'}"], OFFLINE + stand_in(4))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"compute_fid.py: {path} ({weights}) holds NaN or infinite weights (1 tensors, e.g. out.2.bias): "
                     f"the run that wrote it had diverged; use an earlier checkpoint."]
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "g.png").exists()
    assert results.read_text() == '{"fid": 3.5, "step": 10}\n' and sorted(p.name for p in path.parent.iterdir()) == [
        "fid.jsonl", path.name]


def test_offline_fid_without_files_fails_before_sampling(tmp_path, tiny_checkpoint):
    path, _, _ = tiny_checkpoint
    proc = run_cli(tmp_path, [f"--checkpoint={path}", "--num_gen=8", "--save_samples=s.npz", "--device=cpu",
                              f"--data_dir={tmp_path / 'data'}"], OFFLINE)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "FID is unavailable" in lines[0]
    assert "inception-2015-12-05.pt" in lines[0] and "cifar10_legacy_tensorflow_train_32.npz" in lines[0]
    assert not (tmp_path / "s.npz").exists()


def test_fid_record_with_a_stand_in_extractor(tmp_path, tiny_checkpoint):
    path, _, _ = tiny_checkpoint
    inception = tmp_path / "weights" / fid.INCEPTION_FILENAME
    inception.parent.mkdir()
    inception.write_bytes(b"stand-in")
    rng = np.random.default_rng(0)
    reference = rng.normal(100, 30, size=(64, 16))
    stats = tmp_path / "stats.npz"
    fid.save_statistics(stats, *fid.feature_statistics(reference))
    write_fake_cifar10(tmp_path / "data")  # KID's reference: its 100 train images
    args = [f"--checkpoint={path}", "--num_gen=40", "--batch_size_fid=16", "--integration_method=midpoint",
            "--integration_steps=2", f"--fid_inception_path={inception}", f"--fid_stats_path={stats}",
            "--save_samples=s.npz", "--device=cpu", "--kid", f"--data_dir={tmp_path / 'data'}"]
    proc = run_cli(tmp_path, args, OFFLINE + STAND_IN)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((path.parent / "fid.jsonl").read_text().splitlines()[-1])
    assert record["checkpoint"] == str(path) and record["step"] == 20
    assert record["integration_method"] == "midpoint" and record["integration_steps"] == 2
    assert record["mean_nfe"] == 4 and record["num_gen"] == 40 and record["fid_stats_source"] == "given"
    assert record["seconds"] >= 0 and "git_commit" in record["provenance"]
    # The logged FID is the Frechet distance of the saved samples' stand-in features to the stats.
    with np.load(tmp_path / "s.npz") as npz:
        images = torch.from_numpy(npz["arr_0"]).permute(0, 3, 1, 2)
    features = stand_in_extractor(16)(images).numpy()
    expected = fid.frechet_distance(*fid.feature_statistics(features), *fid.feature_statistics(reference))
    assert record["fid"] == pytest.approx(expected, rel=1e-9)
    assert f"FID {record['fid']:.4f}" in proc.stdout
    # --kid: KID of the same features against the (float32-cached) features of the train images, and no other new field.
    assert set(record) == RECORD_KEYS | {"kid", "kid_std", "kid_subsets", "kid_subset_size"}
    train = stand_in_extractor(16)(load_cifar10(tmp_path / "data")[0]).numpy().astype(np.float32)
    kid = feature_metrics.kernel_inception_distance(train, features, seed=0)
    assert (record["kid"], record["kid_std"], record["kid_subset_size"]) == pytest.approx((kid.kid, kid.kid_std, 40))


def fid_files(tmp_path, num_features):
    """--fid_inception_path / --fid_stats_path flags: a placeholder Inception file (the stand-in replaces
    it) and reference statistics of random features; returns the flags and a scorer for this process."""
    inception = tmp_path / "weights" / fid.INCEPTION_FILENAME
    inception.parent.mkdir(exist_ok=True)
    inception.write_bytes(b"stand-in")
    mu, sigma = fid.feature_statistics(np.random.default_rng(0).normal(100, 30, size=(64, num_features)))
    stats = tmp_path / "stats.npz"
    fid.save_statistics(stats, mu, sigma)
    scorer = fid.FIDScorer(stand_in_extractor(num_features), mu, sigma)
    return [f"--fid_inception_path={inception}", f"--fid_stats_path={stats}"], scorer


def test_sweep_of_the_published_weights_by_name_with_straightness(tmp_path, file_server):
    """--pretrained fetched from a local server (the expected UNet made tiny), a sweep on the same noise:
    one fid.jsonl row per setting with the NFE measured, each the FID this process computes."""
    folder, url, requests = file_server
    torch.manual_seed(3)
    state = random_unet(TINY_CONFIG, 3).state_dict()
    torch.save({"net_model": {f"module.{k}": v for k, v in state.items()}, "ema_model": state, "step": 400000},
               folder / "otcfm_cifar10_weights_step_400000.pt")
    patch = f"from cfm.evaluation import pretrained\npretrained.PAPER_CONFIG = {TINY_CONFIG!r}\n" + stand_in(4)
    flags, scorer = fid_files(tmp_path, 4)
    sweep = "euler:1,3;midpoint:1;dopri5:0.1"
    proc = run_cli(tmp_path, ["--pretrained=otcfm", f"--data_dir={tmp_path / 'data'}", f"--sweep={sweep}", "--num_gen=8",
                              "--batch_size_fid=4", "--straightness=3", "--integration_steps=2", "--device=cpu", *flags],
                   patch, env={"CFM_WEIGHTS_URL": url})
    assert proc.returncode == 0, proc.stderr
    cached = tmp_path / "data" / "weights" / "otcfm_cifar10_weights_step_400000.pt"
    assert cached.is_file() and requests == ["/otcfm_cifar10_weights_step_400000.pt"]
    rows = read_jsonl(cached.parent / "fid.jsonl")
    assert [(r["integration_method"], r.get("integration_steps", r.get("tol"))) for r in rows] == [
        ("euler", 1), ("euler", 3), ("midpoint", 1), ("dopri5", 0.1)]
    assert all(r["model"] == "otcfm" and r["sweep"] == sweep and r["checkpoint"] == str(cached) for r in rows)
    assert set(rows[0]) == RECORD_KEYS | {"sweep", "straightness", "straightness_paths", "straightness_steps",
                                          "straightness_seconds"}  # an unconditional checkpoint's: as before
    assert [r["mean_nfe"] for r in rows[:3]] == [1, 3, 2]
    assert proc.stdout.count("FID ") == 4 and "sampling" in proc.stderr and "img/s" in proc.stderr

    net = build_net_from_checkpoint({"ema_model": state, "unet_config": TINY_CONFIG})
    for row, (method, steps, tol) in zip(rows, [("euler", 1, 1e-5), ("euler", 3, 1e-5), ("midpoint", 1, 1e-5),
                                                ("dopri5", 100, 0.1)]):
        expected = scorer.evaluate_net(net, 8, 4, method, steps, tol, seed=0, progress=False)
        assert row["fid"] == pytest.approx(expected.fid, rel=1e-9) and row["mean_nfe"] == expected.mean_nfe
    assert rows[3]["mean_nfe"] > 2 and len({r["fid"] for r in rows}) == 4
    expected_straightness = straightness(net, 3, 4, steps=2, seed=0)
    assert expected_straightness > 0
    assert all(r["straightness"] == pytest.approx(expected_straightness, rel=1e-9) for r in rows)
    assert all(r["straightness_paths"] == 3 and r["straightness_steps"] == 2 for r in rows)


SAMPLING_STARTS = """
from cfm.evaluation import sampling
def refuse(*args, **kwargs):
    raise RuntimeError("sampling started")
sampling.integrate = refuse
"""

# Root ignores permission bits, so the test makes one folder unwritable by refusing the probe file there.
LOCKED_FOLDER = """
import tempfile
real_temporary_file = tempfile.TemporaryFile
def temporary_file(*args, dir=None, **kwargs):
    if dir is not None and "locked" in str(dir):
        raise PermissionError(13, "Permission denied", str(dir))
    return real_temporary_file(*args, dir=dir, **kwargs)
tempfile.TemporaryFile = temporary_file
"""


def test_unwritable_output_paths_stop_the_run_before_sampling(tmp_path, tiny_checkpoint):
    path, _, _ = tiny_checkpoint
    proc = run_cli(tmp_path, [f"--checkpoint={path}", *SAMPLING, "--save_samples=out/s.npz", "--grid=locked/g.png",
                              "--device=cpu"], LOCKED_FOLDER + SAMPLING_STARTS)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write --grid=locked/g.png (PermissionError" in lines[0], proc.stderr
    assert "sampling started" not in proc.stderr and not (tmp_path / "out" / "s.npz").exists()


# os.access is what judges a results folder (root ignores permission bits): refuse the run folder's.
READ_ONLY_RUN_FOLDER = """
import os
real_access = os.access
os.access = lambda path, mode, **kw: False if str(path).endswith("otcfm") else real_access(path, mode, **kw)
"""


def test_an_unwritable_results_folder_stops_the_run_before_sampling(tmp_path, tiny_checkpoint):
    path, _, _ = tiny_checkpoint
    flags, _ = fid_files(tmp_path, 4)
    args = [f"--checkpoint={path}", "--num_gen=8", "--batch_size_fid=4", "--integration_method=euler",
            "--integration_steps=2", "--device=cpu", *flags]
    proc = run_cli(tmp_path, args, OFFLINE + stand_in(4) + READ_ONLY_RUN_FOLDER + SAMPLING_STARTS)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot append to {path.parent / 'fid.jsonl'} ({path.parent} is not writable)" in lines[0]
    assert "sampling started" not in proc.stderr


def test_torchrun_two_processes_give_the_single_process_samples_fid_and_straightness(tmp_path, tiny_checkpoint):
    """9 samples in batches of 4 on 2 ranks (batches 0, 2 on rank 0, batch 1 on rank 1), dopri5: the
    gathered samples, FID, NFE and straightness are those of one process."""
    path, _, ema = tiny_checkpoint
    flags, scorer = fid_files(tmp_path, 4)
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    proc = run_cli(tmp_path, [f"--checkpoint={path}", "--num_gen=9", "--batch_size_fid=4", "--integration_method=dopri5",
                              "--tol=0.1", "--straightness=3", "--integration_steps=2", "--save_samples=s.npz",
                              "--device=cpu", *flags], OFFLINE + stand_in(4), launcher=torchrun)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = read_jsonl(path.parent / "fid.jsonl")[-1]
    assert record["world_size"] == 2 and record["integration_method"] == "dopri5"
    expected = scorer.evaluate_net(ema, 9, 4, "dopri5", tol=0.1, seed=0, keep_samples=True, progress=False)
    with np.load(tmp_path / "s.npz") as npz:
        assert np.array_equal(npz["arr_0"], expected.samples.permute(0, 2, 3, 1).numpy())
    assert record["fid"] == pytest.approx(expected.fid, rel=1e-9) and record["mean_nfe"] == expected.mean_nfe
    assert record["straightness"] == pytest.approx(straightness(ema, 3, 4, steps=2, seed=0), rel=1e-9)
    assert proc.stdout.count("FID ") == 1  # rank 0 alone reports
    assert "sampling (rank 0 of 2)" in proc.stderr and "rank 1 of 2" not in proc.stderr  # the bar: rank 0 only


FULL_DISK = """
import errno
import numpy as np
import torchvision.utils

def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

np.savez = full
torchvision.utils.save_image = full
"""


@pytest.mark.parametrize("flag, name", [("--save_samples", "s.npz"), ("--grid", "g.png")])
def test_a_full_disk_after_sampling_is_one_sentence_and_no_partial_file(tmp_path, tiny_checkpoint, flag, name):
    path, _, _ = tiny_checkpoint
    proc = run_cli(tmp_path, [f"--checkpoint={path}", *SAMPLING, f"{flag}=out/{name}", "--device=cpu", "--quiet"],
                   FULL_DISK)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"compute_fid.py: cannot write out/{name} (No space left on device): free disk space or make "
                     f"its folder writable, and run again."], proc.stderr[-3000:]
    assert list((tmp_path / "out").iterdir()) == []  # neither the file nor its temp file
