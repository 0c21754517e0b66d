"""compute_fid.py end to end in subprocesses (absl flags are process-global), on tiny checkpoints.

Each run goes through a small runner script that can patch the network away (urlopen raises) and
swap Inception for a stand-in extractor, so nothing is ever downloaded.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sampling import generate_samples
from unet import PAPER_CONFIG, UNetModel

REPO = Path(__file__).resolve().parents[1]
from conftest import TINY_UNET_CONFIG as TINY_CONFIG
SAMPLING = ["--fid=False", "--num_gen=8", "--batch_size_fid=5", "--integration_method=euler", "--integration_steps=2"]

OFFLINE = """
import urllib.error, urllib.request
from pathlib import Path
import fid

def refuse(url, *args, **kwargs):
    raise urllib.error.URLError("offline (test)")

urllib.request.urlopen = refuse
fid.cleanfid_cache_path = lambda filename: Path("no-cache") / filename
"""

# Stand-in for Inception: a fixed random projection of each image to 16 features.
STAND_IN = """
import torch

def load_inception(path, device="cpu"):
    weight = torch.randn(3 * 32 * 32, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return lambda images: images.double().reshape(len(images), -1) @ weight

fid.load_inception = load_inception
"""


# Many small solves: one intra-op thread is faster on a busy 2-core machine (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(tmp_path, args, patches=""):
    runner = tmp_path / "run_compute_fid.py"
    runner.write_text(
        f"import sys\nsys.path.insert(0, {str(REPO)!r})\n{patches}\n"
        "from absl import app\nimport compute_fid\napp.run(compute_fid.main)\n"
    )
    # One thread: two spinning OpenMP threads on a busy 2-core CI box are many times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(runner), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def random_unet(config, seed):
    torch.manual_seed(seed)
    net = UNetModel(**config)
    # The output layer starts at zero (v = 0); randomise it so the flow moves the noise.
    torch.nn.init.normal_(net.out[-1].weight, std=0.05)
    return net


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """Our format: raw and EMA weights differ, the UNet config and step are stored."""
    folder = tmp_path_factory.mktemp("run") / "otcfm"
    folder.mkdir()
    net, ema = random_unet(TINY_CONFIG, 0), random_unet(TINY_CONFIG, 1)
    path = folder / "otcfm_cifar10_weights_step_20.pt"
    torch.save({"net_model": net.state_dict(), "ema_model": ema.state_dict(), "unet_config": ema.config,
                "step": 20}, path)
    return path, net, ema


def test_samples_npz_grid_and_seed(tmp_path, tiny_checkpoint):
    path, net, ema = tiny_checkpoint
    proc = run_cli(tmp_path, [f"--checkpoint={path}", *SAMPLING, "--save_samples=s.npz", "--grid=g.png", "--seed=3",
                              "--device=cpu"])
    assert proc.returncode == 0, proc.stderr
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
    import fid

    path, _, _ = tiny_checkpoint
    inception = tmp_path / "weights" / fid.INCEPTION_FILENAME
    inception.parent.mkdir()
    inception.write_bytes(b"stand-in")
    rng = np.random.default_rng(0)
    reference = rng.normal(100, 30, size=(64, 16))
    stats = tmp_path / "stats.npz"
    fid.save_statistics(stats, *fid.feature_statistics(reference))
    args = [f"--checkpoint={path}", "--num_gen=40", "--batch_size_fid=16", "--integration_method=midpoint",
            "--integration_steps=2", f"--fid_inception_path={inception}", f"--fid_stats_path={stats}",
            "--save_samples=s.npz", "--device=cpu"]
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
    weight = torch.randn(3 * 32 * 32, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    features = (images.double().reshape(40, -1) @ weight).numpy()
    expected = fid.frechet_distance(*fid.feature_statistics(features), *fid.feature_statistics(reference))
    assert record["fid"] == pytest.approx(expected, rel=1e-9)
    assert f"FID {record['fid']:.4f}" in proc.stdout
