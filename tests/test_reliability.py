"""Long runs survive pre-emption, divergence, a second writer and torn logs, and lose nothing."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import run_lock
import training
import utils_cifar
from test_training import run_plain
from test_training import tiny_args as training_tiny_args

REPO = Path(__file__).resolve().parents[1]
PREFIX = "otcfm_cifar10"


def tiny_args(data_dir, output_dir, *extra):
    """test_training's tiny run, logging every step (the tests below wait for a logged step)."""
    return training_tiny_args(data_dir, output_dir, "--log_step=1", *extra)


def checkpoint(folder, step):
    return torch.load(Path(folder) / f"otcfm/{PREFIX}_weights_step_{step}.pt", weights_only=True)


def assert_same_weights(a, b):
    for key in ("net_model", "ema_model"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"


def start_script(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "train_cifar10.py", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(metrics: Path, step: int, process, timeout=300):
    """Block until the run has logged `step` (its metrics file), or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        if metrics.is_file() and any(r.get("step", -1) >= step and "loss" in r for r in utils_cifar.read_jsonl(metrics)):
            return
        time.sleep(0.05)
    pytest.fail(f"the run never logged step {step}")


# ------------------------------------------------------------------------------- pre-emption


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_is_exact(fake_cifar, tmp_path, signum, code):
    data_dir, _, _ = fake_cifar
    total = ["--total_steps=16", "--save_step=1000"]  # only the last step saves on its own
    process = start_script(tiny_args(data_dir, tmp_path / "stopped", *total))
    wait_for_step(tmp_path / f"stopped/otcfm/{PREFIX}_metrics.jsonl", 2, process)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr
    saved = sorted((tmp_path / "stopped/otcfm").glob("*.pt"))
    assert len(saved) == 1, saved  # the checkpoint of the stopped step, and nothing else
    stopped = torch.load(saved[0], weights_only=True)
    assert 2 <= stopped["step"] < 15
    assert not any(p.name.endswith(".png") for p in (tmp_path / "stopped/otcfm").iterdir())  # no grids
    line = f"stopped by {signal.Signals(signum).name} after step {stopped['step']}: checkpoint {saved[0]}"
    assert line in stdout
    if signum != signal.SIGTERM:
        return
    # Resumed, the run ends exactly where an uninterrupted one does; the stopped run pipelined its
    # OT (the default), the uninterrupted one solves it inline.
    subprocess.run([sys.executable, "train_cifar10.py", *tiny_args(data_dir, tmp_path / "stopped", *total),
                    f"--checkpoint_path={saved[0]}"], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    subprocess.run([sys.executable, "train_cifar10.py", *tiny_args(data_dir, tmp_path / "straight", *total),
                    "--ot_pipeline=False"], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert_same_weights(checkpoint(tmp_path / "straight", 15), checkpoint(tmp_path / "stopped", 15))


# ---------------------------------------------------------------------------- --resume=auto


def test_resume_auto_takes_the_highest_step_that_loads_and_starts_fresh_without_one(fake_cifar, tmp_path, caplog):
    data_dir, _, _ = fake_cifar
    run_plain(tiny_args(data_dir, tmp_path, "--total_steps=3", "--save_step=2", "--resume=auto"))  # fresh
    assert checkpoint(tmp_path, 2)["optim"]["state"][0]["step"].item() == 3
    # A good checkpoint at step 10 (after step 2 by number, before it by name) and a torn one at 12.
    ckpt = checkpoint(tmp_path, 2)
    torch.save({**ckpt, "step": 10}, tmp_path / f"otcfm/{PREFIX}_weights_step_10.pt")
    (tmp_path / f"otcfm/{PREFIX}_weights_step_12.pt").write_bytes(b"torn")
    caplog.set_level("WARNING")
    run_plain(tiny_args(data_dir, tmp_path, "--total_steps=12", "--save_step=100", "--resume=auto"))
    resumed = checkpoint(tmp_path, 11)
    assert resumed["optim"]["state"][0]["step"].item() == 4  # the 3 updates of step_10 + step 11
    assert f"{PREFIX}_weights_step_12.pt" in caplog.text  # named, not deleted
    assert (tmp_path / f"otcfm/{PREFIX}_weights_step_12.pt").read_bytes() == b"torn"


def test_resume_auto_refuses_a_run_whose_checkpoints_all_fail_to_load(fake_cifar, tmp_path):
    data_dir, _, _ = fake_cifar
    (tmp_path / "otcfm").mkdir()
    (tmp_path / f"otcfm/{PREFIX}_weights_step_4.pt").write_bytes(b"torn")
    with pytest.raises(SystemExit, match="none loads"):
        run_plain(tiny_args(data_dir, tmp_path, "--total_steps=3", "--resume=auto"))


# ------------------------------------------------------------------------------- divergence


def test_a_non_finite_loss_stops_the_run_and_nothing_non_finite_is_written(fake_cifar, tmp_path, monkeypatch):
    data_dir, _, _ = fake_cifar
    step = training.Trainer.step

    def poisoned(self, index, with_metrics=False):  # the weights turn NaN during step 3
        if index == 3:
            with torch.no_grad():
                self.params[0].fill_(float("nan"))
        return step(self, index, with_metrics)

    monkeypatch.setattr(training.Trainer, "step", poisoned)
    with pytest.raises(SystemExit) as exit_info:
        run_plain(tiny_args(data_dir, tmp_path, "--total_steps=9", "--save_step=2", "--log_step=4"))
    message = str(exit_info.value.code)
    good = tmp_path / f"otcfm/{PREFIX}_weights_step_2.pt"
    assert message.startswith("error: training diverged") and "\n" not in message
    assert "at step 3 (loss=nan" in message and f"the last good checkpoint is {good}" in message
    assert sorted(p.name for p in (tmp_path / "otcfm").glob("*.pt")) == [good.name]  # none after step 3
    ckpt = torch.load(good, weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["net_model"].values())
    # The metrics are strict JSON; the step-0 line is the last one logged.
    lines = (tmp_path / f"otcfm/{PREFIX}_metrics.jsonl").read_text().splitlines()
    assert [json.loads(line, parse_constant=pytest.fail)["step"] for line in lines] == [0, 0]


def test_non_finite_weights_are_refused_with_one_sentence():
    from unet import UNetModel

    from conftest import TINY_UNET_CONFIG

    net = UNetModel(**TINY_UNET_CONFIG)
    state = net.state_dict()
    state["out.2.bias"] = torch.full_like(state["out.2.bias"], float("nan"))
    with pytest.raises(utils_cifar.CheckpointError, match=r"^run.pt \(ema_model\) holds NaN or infinite weights "
                                                          r"\(1 tensors, e.g. out.2.bias\)"):
        utils_cifar.load_weights(net, state, "run.pt (ema_model)")


# ------------------------------------------------------------------------------------ locks


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_run_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path, monkeypatch):
    first = run_lock.RunLock(tmp_path, "otcfm_cifar10")
    assert first.acquire() is None
    second = run_lock.RunLock(tmp_path, "otcfm_cifar10")
    with pytest.raises(run_lock.RunLocked, match=rf"in use by another run of otcfm_cifar10 \(pid {os.getpid()} on "):
        second.acquire()
    assert run_lock.RunLock(tmp_path, "otcfm_cifar10_anchor_1e0").acquire() is None  # another run name: its own lock

    host = socket.gethostname()
    stale = {
        "dead pid on this host": {"pid": dead_pid(), "host": host, "heartbeat": time.time()},
        "silent other host": {"pid": 1, "host": "elsewhere", "heartbeat": time.time() - run_lock.STALE_AFTER - 1},
        "unreadable": None,
    }
    for why, record in stale.items():
        first.path.write_text("{not json" if record is None else json.dumps(record))
        taker = run_lock.RunLock(tmp_path, "otcfm_cifar10")
        assert taker.acquire() is not None, why
        assert json.loads(first.path.read_text())["pid"] == os.getpid()
    first.path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "heartbeat": time.time() - 5}))
    with pytest.raises(run_lock.RunLocked, match="pid 1 on elsewhere, last heartbeat 5 s ago"):
        run_lock.RunLock(tmp_path, "otcfm_cifar10").acquire()
    taker.release()  # no longer its lock: released only by its holder
    assert first.path.is_file()


def test_a_second_run_of_the_same_name_is_refused_even_with_overwrite(fake_cifar, tmp_path):
    data_dir, _, _ = fake_cifar
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "otcfm").mkdir()
        (tmp_path / f"otcfm/{PREFIX}.lock").write_text(
            json.dumps({"pid": holder.pid, "host": socket.gethostname(), "heartbeat": time.time()}))
        with pytest.raises(SystemExit, match=f"pid {holder.pid}"):
            run_plain(tiny_args(data_dir, tmp_path, "--total_steps=2", "--overwrite"))
        assert not list((tmp_path / "otcfm").glob("*.pt"))
    finally:
        holder.kill()
        holder.wait()
    run_plain(tiny_args(data_dir, tmp_path, "--total_steps=2"))  # the holder is gone: the lock is stale
    assert not (tmp_path / f"otcfm/{PREFIX}.lock").exists()  # released at the end
    assert checkpoint(tmp_path, 1)["step"] == 1


# ------------------------------------------------------------------------------------- logs


def test_a_torn_metrics_line_is_survived_on_resume(fake_cifar, tmp_path):
    data_dir, _, _ = fake_cifar
    run_plain(tiny_args(data_dir, tmp_path, "--total_steps=3", "--save_step=2"))
    metrics = tmp_path / f"otcfm/{PREFIX}_metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": ')  # a full disk mid-append
    with pytest.warns(UserWarning, match="torn write"):
        run_plain(tiny_args(data_dir, tmp_path, "--total_steps=4", "--save_step=2",
                            f"--checkpoint_path={tmp_path}/otcfm/{PREFIX}_weights_step_2.pt"))
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [0, 0, 1, 2, 3, 3]  # start, 0, 1, 2 (kept: logged before the step-2 save), restart, 3


def worker_pids(launcher_pid):
    """{rank: pid} of the worker processes a torchrun launcher started (Linux /proc)."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    ranks = {}
    for pid in children:
        env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
        if "RANK" in env:
            ranks[int(env["RANK"])] = int(pid)
    return ranks


def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_after_the_same_step(fake_cifar, tmp_path):
    """Only rank 1 gets SIGTERM: the ranks agree (gloo side group), rank 0 writes the one checkpoint,
    and every process exits 0."""
    data_dir, _, _ = fake_cifar
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
         "train_cifar10.py", *tiny_args(data_dir, tmp_path, "--batch_size=8", "--total_steps=30", "--save_step=1000")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path / f"otcfm/{PREFIX}_metrics.jsonl", 2, launcher)
    os.kill(worker_pids(launcher.pid)[1], signal.SIGTERM)
    stdout, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, stderr[-3000:]
    saved = sorted((tmp_path / "otcfm").glob("*.pt"))
    assert len(saved) == 1 and 2 <= torch.load(saved[0], weights_only=True)["step"] < 29
    assert stdout.count("stopped by SIGTERM after step") == 1  # rank 0 alone says it
