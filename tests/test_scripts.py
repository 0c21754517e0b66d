"""The three training scripts run their published commands and resume exactly (N == N/2 + N/2)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SUBPROCESS_TIMEOUT_S, TINY_UNET_FLAGS

REPO = Path(__file__).resolve().parents[1]

# The published commands, verbatim (published-experiments README); tests append tiny-run flags.
PUBLISHED = {
    "plain": ("train_cifar10.py", "otcfm", "otcfm_cifar10",
              "--model=otcfm --lr=2e-4 --ema_decay=0.9999 --batch_size=128 --total_steps=400001 "
              "--save_step=20000 --num_subclasses=25 --visualize=True"),
    "locality": ("train_cifar10_locality.py", "otcfm_local_1e0", "otcfm_cifar10_local_1e0",
                 "--model=otcfm --batch_size=128 --total_steps=400001 --save_step=20000 --lambda_local=1.0 "
                 "--lambda_name=1e0 --num_subclasses=25 --visualize=True"),
    "anchor": ("train_cifar10_anchor.py", "otcfm_anchor_full", "otcfm_cifar10_anchor_1e0",
               "--model=otcfm --batch_size=128 --total_steps=400001 --save_step=20000 --lambda_anchor=1.0 "
               "--lambda_name=1e0 --centroid_update_freq=1000 --anchor_loss_type=full --num_subclasses=25 "
               "--visualize=True"),
}


def run_script(script, args, check=True):
    result = subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=SUBPROCESS_TIMEOUT_S)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def tiny(data_dir, out, *extra):
    # 100 fake images, 2 clusters per class (5 images each, batch 4); the anchor centroids refresh
    # every 2 steps so the resume crosses a refresh (other scripts are told to ignore those flags).
    return [*TINY_UNET_FLAGS, "--batch_size=4", "--num_subclasses=2", "--grid_size=4", "--grid_steps=2",
            "--log_step=2", "--warmup=2", "--centroid_update_freq=2", "--centroid_samples=3",
            f"--group_dir={out}/group", f"--data_dir={data_dir}", f"--output_dir={out}",
            "--wandb_mode=disabled", "--device=cpu", *extra]


def records(path):
    """The metric lines of a metrics file (not its start lines, which record provenance)."""
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("event") != "start"]


@pytest.mark.parametrize("kind", list(PUBLISHED))
def test_published_command_runs_and_resumes_exactly(kind, fake_cifar, tmp_path):
    """6 steps straight == 5 steps (a 'crash' after the step-4 save) + resume from the step-3 save."""
    script, run_dir, prefix, published = PUBLISHED[kind]
    data_dir, _, _ = fake_cifar
    extra = [] if kind == "anchor" else ["--undefok=centroid_update_freq,centroid_samples"]
    command = [*published.split(), *extra]
    run_script(script, [*command, *tiny(data_dir, tmp_path / "full", "--total_steps=6", "--save_step=3")])
    run_script(script, [*command, *tiny(data_dir, tmp_path / "part", "--total_steps=5", "--save_step=3")])
    ckpt3 = tmp_path / f"part/{run_dir}/{prefix}_weights_step_3.pt"
    run_script(script, [*command, *tiny(data_dir, tmp_path / "part", "--total_steps=6", "--save_step=3",
                                        f"--checkpoint_path={ckpt3}")])
    a = torch.load(tmp_path / f"full/{run_dir}/{prefix}_weights_step_5.pt", weights_only=True)
    b = torch.load(tmp_path / f"part/{run_dir}/{prefix}_weights_step_5.pt", weights_only=True)
    for key in ("net_model", "ema_model"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{kind}: {key}.{name} differs after resume"
    if kind == "anchor":
        assert torch.equal(a["regularizer"]["centroids"], b["regularizer"]["centroids"])

    # The resumed history equals the uninterrupted one: the 'crashed' run's step-4 line was dropped
    # and logged again with the same values.
    full = records(tmp_path / f"full/{run_dir}/{prefix}_metrics.jsonl")
    resumed = records(tmp_path / f"part/{run_dir}/{prefix}_metrics.jsonl")
    assert [r["step"] for r in full] == [r["step"] for r in resumed] == [0, 2, 4, 5]
    for x, y in zip(full, resumed):
        assert {k: v for k, v in x.items() if k != "seconds"} == {k: v for k, v in y.items() if k != "seconds"}

    reg_name = {"plain": "local", "locality": "local", "anchor": "anchor"}[kind]
    for r in full:
        assert r[f"{reg_name}_loss"] >= 0 and r["loss_fm"] > 0
        assert r["regularized_loss"] == r[f"{reg_name}_loss"]
        trained = r["loss_fm"] + (0.0 if kind == "plain" else 1.0) * r["regularized_loss"]  # plain: monitor only
        assert r["loss"] == pytest.approx(trained, rel=1e-5)
    grids = sorted(p.name for p in (tmp_path / "full/group").glob("class_*.png"))
    assert len(grids) == 20 and grids[3] == "class_003_orig_1_sub_01.png"
    assert "20 non-empty clusters" in (tmp_path / "full/group/README.txt").read_text()


def test_a_regularizer_can_start_from_a_plain_checkpoint(fake_cifar, tmp_path):
    """Weights and optimizer carry over; the batch stream (shuffled -> clustered) restarts from --seed."""
    data_dir, _, labels = fake_cifar
    script, run_dir, prefix, published = PUBLISHED["plain"]
    run_script(script, [*published.split(), *tiny(data_dir, tmp_path, "--total_steps=3", "--save_step=2"),
                        "--undefok=centroid_update_freq,centroid_samples"])
    plain = tmp_path / f"{run_dir}/{prefix}_weights_step_2.pt"
    script, run_dir, prefix, published = PUBLISHED["locality"]
    result = run_script(script, [*published.split(), *tiny(data_dir, tmp_path, "--total_steps=4", "--save_step=3",
                                                           f"--checkpoint_path={plain}"),
                                 "--undefok=centroid_update_freq,centroid_samples"])
    assert "restarts from --seed" in result.stderr
    ckpt = torch.load(tmp_path / f"{run_dir}/{prefix}_weights_step_3.pt", weights_only=True)
    assert ckpt["optim"]["state"][0]["step"].item() == 4  # 3 updates before the checkpoint, 1 after
    assignment = ckpt["streams"]["batches"]["assignment"]
    assert torch.equal(assignment // 2, torch.as_tensor(labels))  # the clusters it trained on are stored


def test_bad_anchor_loss_type_is_a_clear_error(fake_cifar, tmp_path):
    data_dir, _, _ = fake_cifar
    result = run_script("train_cifar10_anchor.py", [*tiny(data_dir, tmp_path, "--total_steps=2"),
                                                    "--anchor_loss_type=fancy"], check=False)
    assert result.returncode != 0
    assert "anchor_loss_type" in result.stderr and "full" in result.stderr and "simple" in result.stderr
    assert not (tmp_path / "otcfm_anchor_fancy").exists()


# ---------------------------------------------------------------- world-size invariance (torchrun)

DDP_PUBLISHED = ("--model=otcfm --lr=2e-4 --ema_decay=0.9999 --batch_size=128 --total_steps=400001 "
                 "--save_step=20000 --parallel=True --master_addr=MASTER_ADDR --master_port=MASTER_PORT").split()


def train_on(procs, script, published, out, data_dir, *extra):
    """Run `script` with its `published` flags on `procs` processes (torchrun with gloo when > 1),
    global batch 8, no dropout, one cluster per class (10 fake images per class hold a batch of 8;
    two clusters of 5 do not, and the run is refused)."""
    launcher = [sys.executable]
    if procs > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={procs}"]
    args = [*launcher, script, *published,
            *tiny(data_dir, out, "--batch_size=8", "--dropout=0", "--num_subclasses=1", *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def world_runs(fake_cifar, tmp_path_factory):
    """The same runs on 1 and on 2 processes: otcfm (plus a 1-process resume of the 2-process
    checkpoint), icfm and the anchor script. Returns {name: net weights at the last step}."""
    data_dir, _, _ = fake_cifar
    root = tmp_path_factory.mktemp("world")
    plain = [*DDP_PUBLISHED, "--undefok=centroid_update_freq,centroid_samples"]
    anchor = PUBLISHED["anchor"][3].split()
    runs = {
        "otcfm": ("train_cifar10_ddp.py", plain, ["--total_steps=4", "--save_step=2"], "otcfm/otcfm_cifar10_weights_step_3.pt"),
        "icfm": ("train_cifar10_ddp.py", plain, ["--model=icfm", "--total_steps=3"], "icfm/icfm_cifar10_weights_step_2.pt"),
        "anchor": ("train_cifar10_anchor.py", anchor, ["--total_steps=3"],
                   "otcfm_anchor_full/otcfm_cifar10_anchor_1e0_weights_step_2.pt"),
    }
    weights = {}
    for name, (script, published, args, ckpt) in runs.items():
        for procs in (1, 2):
            out = root / f"{name}{procs}"
            train_on(procs, script, published, out, data_dir, *args)
            weights[f"{name}{procs}"] = torch.load(out / ckpt, weights_only=True)
    # A 2-process checkpoint resumed on 1 process (the streams are shared, so any world size fits).
    resumed = root / "otcfm2"
    ckpt2 = resumed / "otcfm/otcfm_cifar10_weights_step_2.pt"
    (resumed / "otcfm/otcfm_cifar10_weights_step_3.pt").unlink()
    train_on(1, "train_cifar10_ddp.py", plain, resumed, data_dir, *runs["otcfm"][2], f"--checkpoint_path={ckpt2}")
    weights["otcfm2->1"] = torch.load(resumed / runs["otcfm"][3], weights_only=True)
    return weights


def relative_difference(a, b):
    """max |w_a - w_b| / max |w_a| over all tensors of two state dicts."""
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    scale = max(a[k].abs().max().item() for k in a)
    return diff / scale


# The tests of `world_runs` (module-scoped: 7 script runs) share one xdist worker, or each worker would train them.
@pytest.mark.xdist_group("world_runs")
@pytest.mark.parametrize("name", ["otcfm", "icfm", "anchor"])
def test_two_processes_train_what_one_process_trains(world_runs, name):
    one, two = world_runs[f"{name}1"], world_runs[f"{name}2"]
    assert relative_difference(one["net_model"], two["net_model"]) <= 1e-5
    assert relative_difference(one["ema_model"], two["ema_model"]) <= 1e-5
    # not vacuous: the step changed the weights by far more than the tolerance
    assert one["optim"]["state"][0]["step"].item() > 1
    assert len(two["rank_states"]) == 2 and "streams" in two
    assert two["flags"]["batch_size"] == 8  # global: 4 rows per rank


@pytest.mark.xdist_group("world_runs")
def test_a_checkpoint_of_two_processes_resumes_on_one(world_runs):
    assert relative_difference(world_runs["otcfm1"]["net_model"], world_runs["otcfm2->1"]["net_model"]) <= 1e-5


@pytest.mark.xdist_group("world_runs")
def test_local_ot_scope_pairs_within_each_rank(world_runs, fake_cifar, tmp_path):
    """--ot_scope=local (the published per-rank pairing) trains something else on 2 processes."""
    data_dir, _, _ = fake_cifar
    published = [*DDP_PUBLISHED, "--undefok=centroid_update_freq,centroid_samples"]
    train_on(2, "train_cifar10_ddp.py", published, tmp_path, data_dir, "--total_steps=4", "--save_step=2",
             "--ot_scope=local")
    local = torch.load(tmp_path / "otcfm/otcfm_cifar10_weights_step_3.pt", weights_only=True)["net_model"]
    assert relative_difference(world_runs["otcfm1"]["net_model"], local) > 1e-4  # 10x the invariance tolerance
