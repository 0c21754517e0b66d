"""The three training scripts run their published commands and resume exactly (N == N/2 + N/2)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_UNET_FLAGS

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
    result = subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def tiny(data_dir, out, *extra):
    # 100 fake images, 2 clusters per class (5 images each, batch 4); the anchor centroids refresh
    # every 2 steps so the resume crosses a refresh (other scripts are told to ignore those flags).
    return [*TINY_UNET_FLAGS, "--batch_size=4", "--num_subclasses=2", "--grid_size=4", "--grid_steps=2",
            "--log_step=1", "--warmup=2", "--centroid_update_freq=2", "--centroid_samples=3",
            f"--group_dir={out}/group", f"--data_dir={data_dir}", f"--output_dir={out}",
            "--wandb_mode=disabled", "--device=cpu", *extra]


@pytest.mark.parametrize("kind", list(PUBLISHED))
def test_published_command_runs_and_resumes_exactly(kind, fake_cifar, tmp_path):
    script, run_dir, prefix, published = PUBLISHED[kind]
    data_dir, _, _ = fake_cifar
    extra = [] if kind == "anchor" else ["--undefok=centroid_update_freq,centroid_samples"]
    full = run_script(script, [*published.split(), *tiny(data_dir, tmp_path / "full", "--total_steps=6",
                                                         "--save_step=3"), *extra])
    run_script(script, [*published.split(), *tiny(data_dir, tmp_path / "part", "--total_steps=4",
                                                  "--save_step=3"), *extra])
    ckpt3 = tmp_path / f"part/{run_dir}/{prefix}_weights_step_3.pt"
    run_script(script, [*published.split(), *tiny(data_dir, tmp_path / "part", "--total_steps=6",
                                                  "--save_step=3", f"--checkpoint_path={ckpt3}"), *extra])
    a = torch.load(tmp_path / f"full/{run_dir}/{prefix}_weights_step_5.pt", weights_only=True)
    b = torch.load(tmp_path / f"part/{run_dir}/{prefix}_weights_step_5.pt", weights_only=True)
    for key in ("net_model", "ema_model"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{kind}: {key}.{name} differs after resume"
    if kind == "anchor":
        assert torch.equal(a["regularizer"]["centroids"], b["regularizer"]["centroids"])

    records = [json.loads(line) for line in (tmp_path / f"full/{run_dir}/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(6))
    reg_name = {"plain": "local", "locality": "local", "anchor": "anchor"}[kind]
    for r in records:
        assert r[f"{reg_name}_loss"] >= 0 and r["loss_fm"] > 0
        if kind == "plain":
            assert "regularized_loss" not in r and r["loss"] == pytest.approx(r["loss_fm"])  # monitor only
        else:
            assert r["regularized_loss"] == r[f"{reg_name}_loss"]
            assert r["loss"] == pytest.approx(r["loss_fm"] + 1.0 * r["regularized_loss"], rel=1e-5)
    assert (tmp_path / "full/group/README.txt").is_file()
    assert len(list((tmp_path / "full/group").glob("class_*_orig_*_sub_*.png"))) == 20
    assert full.returncode == 0


def test_every_batch_of_a_clustered_run_comes_from_one_cluster(fake_cifar, tmp_path):
    """The logged cluster id of each step's batch is one of the 20 clusters, and the locality run
    stores the assignment it trained on."""
    script, run_dir, prefix, published = PUBLISHED["locality"]
    data_dir, _, labels = fake_cifar
    run_script(script, [*published.split(), *tiny(data_dir, tmp_path, "--total_steps=4", "--save_step=3"),
                        "--undefok=centroid_update_freq,centroid_samples"])
    ckpt = torch.load(tmp_path / f"{run_dir}/{prefix}_weights_step_3.pt", weights_only=True)
    assignment = ckpt["rank_states"][0]["batches"]["assignment"]
    assert torch.equal(assignment // 2, torch.as_tensor(labels))
    records = [json.loads(line) for line in (tmp_path / f"{run_dir}/metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["cluster"] < 20 for r in records)


def test_bad_anchor_loss_type_is_a_clear_error(fake_cifar, tmp_path):
    data_dir, _, _ = fake_cifar
    result = run_script("train_cifar10_anchor.py", [*tiny(data_dir, tmp_path, "--total_steps=2"),
                                                    "--anchor_loss_type=fancy"], check=False)
    assert result.returncode != 0
    assert "anchor_loss_type" in result.stderr and "full" in result.stderr and "simple" in result.stderr
    assert not (tmp_path / "otcfm_anchor_fancy").exists()
