"""Up-front checks: every input mistake is one sentence and a non-zero exit, before any data are loaded."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from absl import flags
from conftest import SUBPROCESS_TIMEOUT_S, TINY_UNET_CONFIG
from test_training import run_plain, tiny_args

from cfm.io import cifar10
from cfm.method import samplers
from cfm.method.unet import UNetModel

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_data(monkeypatch):
    """Any attempt to load CIFAR-10 (which comes before clustering) fails the test."""
    monkeypatch.setattr(cifar10, "load_cifar10", lambda *a, **k: pytest.fail("the data were loaded"))


def one_sentence(args) -> str:
    """The message a bad training command exits with; asserts it is one line after 'error: '."""
    with pytest.raises(SystemExit) as exit_info:
        run_plain(args)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message and message.endswith("."), message
    return message


def written(folder) -> list:
    """The files under `folder` (a refused run may leave its empty run folder, never a file)."""
    return [p for p in Path(folder).rglob("*") if p.is_file()]


def resumable(**changes) -> dict:
    """A checkpoint of the tiny UNet as training writes it after one update (Adam moments present)."""
    torch.manual_seed(0)
    net = UNetModel(**TINY_UNET_CONFIG)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    sum(p.sum() for p in net.parameters()).backward()
    optimizer.step()
    scheduler.step()
    ckpt = {"net_model": net.state_dict(), "ema_model": net.state_dict(), "optim": optimizer.state_dict(),
            "sched": scheduler.state_dict(), "step": 0}
    ckpt.update(changes)
    return {k: v for k, v in ckpt.items() if v is not None}


def swapped_moments(ckpt: dict) -> dict:
    """The optimizer state with the first and last parameters' moments exchanged (the parameter
    count matches, which is all torch's own load_state_dict compares)."""
    optim = {"state": dict(ckpt["optim"]["state"]), "param_groups": ckpt["optim"]["param_groups"]}
    last = max(optim["state"])
    optim["state"][0], optim["state"][last] = optim["state"][last], optim["state"][0]
    return optim


@pytest.mark.parametrize("extra, expected", [
    (["--lr=nan"], "--lr=nan is not a learning rate"),
    (["--lr=-1e-4"], "--lr=-0.0001 is not a learning rate"),
    (["--num_head_channels=24"], "--num_head_channels=24 does not split the attention blocks' channels (64)"),
    (["--attention_resolutions=7"], "--attention_resolutions=7 asks for attention at 7x7"),
    (["--attention_resolutions=16,8"], "attention at 8x8, a resolution this UNet does not have: pick among 32,16"),
    (["--num_channel=48"], "--num_channel=48 is not a positive multiple of 32"),
    (["--device=tpu"], "--device=tpu is not a device this code runs on"),
])
def test_bad_flags_are_one_sentence_before_the_data(fake_cifar, tmp_path, no_data, extra, expected):
    data_dir, _, _ = fake_cifar
    assert expected in one_sentence(tiny_args(data_dir, tmp_path, *extra))


@pytest.mark.parametrize("flag", ["--channel_mult=a,b", "--attention_resolutions=16,x"])
def test_malformed_list_flags_fail_at_parsing(flag):
    with pytest.raises(flags.IllegalFlagValueError, match="must be comma-separated positive integers"):
        run_plain([flag])


def test_unwritable_output_dir_is_one_sentence_before_the_data(fake_cifar, tmp_path, no_data, monkeypatch):
    data_dir, _, _ = fake_cifar
    a_file = tmp_path / "results.txt"
    a_file.write_text("")
    assert f"{a_file} is a file" in one_sentence(tiny_args(data_dir, a_file))

    # Read-only (a read-only mount refuses root too; os.access is what the check asks).
    read_only = tmp_path / "shared"
    read_only.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if str(path).startswith(str(read_only))
                        else access(path, mode, **kw))
    message = one_sentence(tiny_args(data_dir, read_only / "runs"))
    assert f"{read_only} is not writable" in message and "pass a writable --output_dir" in message


@pytest.mark.parametrize("change, expected", [
    (dict(optim=None, sched=None), "lacks optim, sched, which resuming needs"),
    (dict(ema_model=None), "lacks ema_model"),
    (dict(step=None), "lacks step"),
    (dict(step="last"), "holds no usable 'step' number or 'sched' state"),
    (dict(sched=[]), "holds no usable 'step' number or 'sched' state"),
    ("swap", "optimizer state does not fit this UNet (parameter 0's exp_avg is (3,), the parameter (128, 32))"),
    (dict(optim={"state": {}, "param_groups": [{"params": [0, 1]}]}), "(2 parameters, this UNet has"),
    ("wider", "(net_model) does not fit this UNet"),
])
def test_incomplete_or_mismatched_checkpoint_is_one_sentence_before_the_data(fake_cifar, tmp_path, no_data,
                                                                              change, expected):
    data_dir, _, _ = fake_cifar
    ckpt = resumable()
    if change == "swap":
        ckpt["optim"] = swapped_moments(ckpt)
    elif change == "wider":  # a published-style checkpoint (no unet_config) of another width
        wider = UNetModel(**{**TINY_UNET_CONFIG, "num_channels": 64}).state_dict()
        ckpt.update(net_model=wider, ema_model=wider)
    else:
        ckpt = resumable(**change)
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path)
    message = one_sentence(tiny_args(data_dir, tmp_path / "out", f"--checkpoint_path={path}"))
    assert expected in message and str(path) in message


def test_a_complete_checkpoint_passes_the_checks():
    """The checks accept what they must (training itself resumes such files: test_training)."""
    from cfm.training import checks

    checks.check_resumable(resumable(), "ckpt.pt", UNetModel(**TINY_UNET_CONFIG).config)


# ------------------------------------------------------------------ flags that used to crash


def test_an_unbounded_collective_timeout_is_one_line_at_parsing_even_in_one_process(fake_cifar, tmp_path):
    """--collective_timeout=inf overflowed torch's timeouts (OverflowError) in a plain run too: absl
    now refuses it, and 1e15, at parsing, with RunConfig's bounds."""
    data_dir, _, _ = fake_cifar
    result = subprocess.run([sys.executable, "train_cifar10.py", *tiny_args(data_dir, tmp_path / "out"),
                             "--collective_timeout=inf"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode != 0
    assert "flag --collective_timeout=inf: inf is not a number in the range [10.0, 86400.0]" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    with pytest.raises(flags.IllegalFlagValueError, match=r"=1e15: 1000000000000000.0 is not a number in the range"):
        run_plain(["--collective_timeout=1e15"])


def test_a_checkpoint_path_that_is_a_folder_names_its_newest_checkpoint(fake_cifar, tmp_path, no_data):
    data_dir, _, _ = fake_cifar
    run_dir = tmp_path / "otcfm"
    run_dir.mkdir()
    message = one_sentence(tiny_args(data_dir, tmp_path / "out", f"--checkpoint_path={run_dir}"))
    assert f"checkpoint {run_dir} is a folder that holds no checkpoint" in message and "--resume=auto" in message
    for step in (2, 10):  # step 10 is the newest, though it sorts first by name
        (run_dir / f"otcfm_cifar10_weights_step_{step}.pt").write_bytes(b"not read")
    message = one_sentence(tiny_args(data_dir, tmp_path / "out", f"--checkpoint_path={run_dir}"))
    assert f"is a folder, not a file: pass its newest checkpoint, {run_dir}/otcfm_cifar10_weights_step_10.pt" in message
    assert "--resume=auto" in message and written(tmp_path / "out") == []


@pytest.mark.parametrize("extra, expected", [
    # 10 images per class: 3 clusters of a class average 3.3 images, fewer than a batch of 4.
    (["--num_subclasses=3"], "--num_subclasses=3 splits the smallest class (airplane, 10 images) into clusters of "
                             "3.33333 images on average, fewer than --batch_size=4: pass --num_subclasses=2 or less"),
    (["--num_subclasses=1", "--batch_size=16"], "even the whole class is smaller than a batch: pass --batch_size=10 "
                                                "or less with --num_subclasses=1."),
])
def test_num_subclasses_that_leaves_clusters_smaller_than_a_batch_is_refused_before_kmeans(
        fake_cifar, tmp_path, monkeypatch, extra, expected):
    data_dir, _, _ = fake_cifar
    monkeypatch.setattr(samplers, "cluster_assignments", lambda *a, **k: pytest.fail("clustered"))
    assert expected in one_sentence(tiny_args(data_dir, tmp_path / "out", *extra))
    assert written(tmp_path / "out") == []
