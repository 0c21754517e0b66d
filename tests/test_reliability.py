"""Long runs survive pre-emption, divergence, a second writer and torn logs, and lose nothing."""

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from conftest import SUBPROCESS_TIMEOUT_S
from test_training import run_plain
from test_training import tiny_args as training_tiny_args

from cfm.config import FIDConfig
from cfm.io import atomic_files, checkpoint_io, run_files
from cfm.io.distributed import World
from cfm.method import nets
from cfm.training import run_lock, run_outputs
from cfm.training.trainer import Trainer

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


def start_script(args, **env):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    return subprocess.Popen([sys.executable, "train_cifar10.py", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(metrics: Path, step: int, process, timeout=SUBPROCESS_TIMEOUT_S):
    """Block until the run has logged `step` (its metrics file), or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        if metrics.is_file() and any(r.get("step", -1) >= step and "loss" in r for r in run_files.read_jsonl(metrics)):
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
    stdout, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
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
    step = Trainer.step

    def poisoned(self, index, with_metrics=False):  # the weights turn NaN during step 3
        if index == 3:
            with torch.no_grad():
                self.params[0].fill_(float("nan"))
        return step(self, index, with_metrics)

    monkeypatch.setattr(Trainer, "step", poisoned)
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
    from conftest import TINY_UNET_CONFIG

    from cfm.method.unet import UNetModel

    net = UNetModel(**TINY_UNET_CONFIG)
    state = net.state_dict()
    state["out.2.bias"] = torch.full_like(state["out.2.bias"], float("nan"))
    with pytest.raises(checkpoint_io.CheckpointError, match=r"^run.pt \(ema_model\) holds NaN or infinite weights "
                                                          r"\(1 tensors, e.g. out.2.bias\)"):
        nets.load_weights(net, state, "run.pt (ema_model)")


# ------------------------------------------------------------------------------------ locks


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_run_of_the_same_name_is_refused_even_with_overwrite(fake_cifar, tmp_path):
    data_dir, _, _ = fake_cifar
    holder = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({SUBPROCESS_TIMEOUT_S})"])  # killed
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


def logged_steps(metrics: Path) -> list[int]:
    return [r["step"] for r in run_files.read_jsonl(metrics) if "loss" in r]


def test_a_frozen_run_whose_lock_is_taken_over_writes_nothing_more(fake_cifar, tmp_path):
    """The run freezes (SIGSTOP: a stalled file system, a suspended VM) past the stale limit and a run
    on another host takes its lock over: once thawed, at most the step in flight is still written,
    then it exits 1 with one sentence naming the new holder, whose lock it leaves alone."""
    data_dir, _, _ = fake_cifar
    process = start_script(tiny_args(data_dir, tmp_path, "--total_steps=400", "--save_step=3"),
                           CFM_LOCK_STALE_AFTER="1.2")
    metrics = tmp_path / f"otcfm/{PREFIX}_metrics.jsonl"
    taker = run_lock.RunLock(tmp_path / "otcfm", PREFIX, stale_after=1.2)
    taker.record["host"] = "elsewhere"  # judges by the lock's age, as another node does
    try:
        wait_for_step(metrics, 4, process)
        os.kill(process.pid, signal.SIGSTOP)
        try:
            last = max(logged_steps(metrics))
            taker.acquire(wait=True)  # once the frozen run's lock is stale
        finally:
            os.kill(process.pid, signal.SIGCONT)
        stdout, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        assert process.returncode == 1, stderr[-3000:]
        assert f"(pid {os.getpid()} on elsewhere" in stderr and "Traceback" not in stderr
        assert max(logged_steps(metrics)) <= last + 1  # the step in flight at most
        assert all(checkpoint_step <= last + 1 for checkpoint_step in
                   (torch.load(p, weights_only=True)["step"] for p in (tmp_path / "otcfm").glob("*.pt")))
        assert taker.verify() and taker.owner()["token"] == taker.token  # never overwritten, nor removed
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        taker.release()


def test_a_lock_lost_between_the_two_grids_stops_the_second(fake_cifar, tmp_path, monkeypatch):
    """Each grid checks the lock just before it is drawn: a takeover while the first is drawn leaves
    the second undrawn, and the run stops with one sentence."""
    data_dir, _, _ = fake_cifar
    real_grid, drawn = run_outputs.save_sample_grid, []

    def grid_then_taken_over(model, path, **kwargs):
        real_grid(model, path, **kwargs)
        drawn.append(path.name)
        lock = tmp_path / f"otcfm/{PREFIX}.lock"
        taken = {"pid": 1, "host": "elsewhere", "token": "the new owner"}
        atomic_files.atomic_write(lock, lambda f: f.write(json.dumps(taken).encode()))

    monkeypatch.setattr(run_outputs, "save_sample_grid", grid_then_taken_over)
    with pytest.raises(SystemExit, match=r"taken over by another run, holder of .*\(pid 1 on elsewhere"):
        run_plain(tiny_args(data_dir, tmp_path, "--total_steps=4", "--save_step=2"))
    assert drawn == ["normal_generated_FM_images_step_2.png"]
    assert not (tmp_path / "otcfm/ema_generated_FM_images_step_2.png").exists()
    assert max(logged_steps(tmp_path / f"otcfm/{PREFIX}_metrics.jsonl")) == 2


class LostLock:
    """A lock this run no longer holds."""

    def verify(self):
        return False


def test_a_run_without_its_lock_neither_truncates_nor_appends_its_metrics(tmp_path):
    """The fresh start's truncation, the start line, a metrics line and the FID line all check the
    lock first: a displaced run leaves another run's metrics file as it found it."""
    paths = run_files.RunPaths(tmp_path, PREFIX)
    run_files.append_jsonl(paths.metrics, {"step": 7, "loss": 1.0})  # the new holder's line
    before = paths.metrics.read_bytes()
    logger = run_outputs.RunLogger(paths, {}, "disabled", 0, {}, LostLock())
    logger.log({"step": 0, "loss": 2.0})

    class Scorer:
        def evaluate_net(self, *args, **kwargs):
            return types.SimpleNamespace(fid=1.0, mean_nfe=2.0, num_gen=4, seconds=0.1)

    fid_config = dataclasses.replace(FIDConfig(), fid_num_gen=4)
    assert run_outputs.log_fid(Scorer(), None, fid_config, 0, 0, logger, World(0, 1, torch.device("cpu")), lambda: False) == []
    logger.close()
    assert paths.metrics.read_bytes() == before


@pytest.mark.parametrize("field, value, problem", [
    ("pid", "12x", "its pid '12x' is not a whole number"),
    ("heartbeat", "soon", "its heartbeat 'soon' is not a number"),
])
def test_a_hand_edited_lock_is_one_sentence_before_any_work(fake_cifar, tmp_path, capsys, field, value, problem):
    data_dir, _, _ = fake_cifar
    lock = tmp_path / f"otcfm/{PREFIX}.lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "heartbeat": time.time(), field: value}))
    with pytest.raises(SystemExit) as exit_:
        run_plain(tiny_args(data_dir, tmp_path, "--total_steps=2"))
    assert str(exit_.value.code) == (f"error: {lock} holds a lock record that no run of this program wrote "
                                     f"({problem}): if no run of {PREFIX} is alive, delete it and run again.")
    assert [p.name for p in tmp_path.iterdir()] == ["otcfm"] and [p.name for p in lock.parent.iterdir()] == [lock.name]


def test_another_users_unreadable_lock_is_one_sentence_before_any_work(fake_cifar, tmp_path):
    """A lock written by another user with umask 077: the script says so in one sentence and writes
    nothing (as root, the script runs as nobody, for whom root's 0600 file is unreadable)."""
    data_dir, _, _ = fake_cifar
    output = Path(tempfile.mkdtemp(prefix="unreadable", dir="/tmp"))
    try:
        output.chmod(0o777)
        (output / "otcfm").mkdir(mode=0o777)
        (output / "otcfm").chmod(0o777)
        lock = output / f"otcfm/{PREFIX}.lock"
        lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "heartbeat": time.time()}))
        lock.chmod(0o600 if os.geteuid() == 0 else 0o000)
        command = [sys.executable, "train_cifar10.py", *tiny_args(data_dir, output, "--total_steps=2")]
        if os.geteuid() == 0:
            command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(output)})
        assert done.returncode == 1, done.stderr[-3000:]
        assert done.stderr.strip().splitlines()[-1] == (
            f"error: cannot read {lock} (Permission denied): another user's run of {PREFIX} holds or left this "
            f"lock; ask them to stop it or delete it, or pick another --output_dir.")
        assert "Traceback" not in done.stderr
        assert sorted(p.name for p in output.rglob("*")) == ["otcfm", lock.name]
    finally:
        shutil.rmtree(output)


def test_the_heartbeat_keeps_the_lock_fresh_through_a_slow_save_step(fake_cifar, tmp_path, monkeypatch):
    """A save step whose grids take 2.5 s, with a 1-s stale limit: another host never sees the lock stale."""
    data_dir, _, _ = fake_cifar
    monkeypatch.setenv(run_lock.STALE_ENV, "1")
    real_grid, slept = run_outputs.save_sample_grid, []

    def slow_grid(*args, **kwargs):
        if not slept:
            time.sleep(2.5)
            slept.append(True)
        return real_grid(*args, **kwargs)

    monkeypatch.setattr(run_outputs, "save_sample_grid", slow_grid)
    watcher = run_lock.RunLock(tmp_path / "otcfm", PREFIX, stale_after=1.0)
    watcher.record["host"] = "elsewhere"  # judges by the heartbeat, as another node would
    seen_stale, checks, done = [], [], threading.Event()

    def watch():
        while not done.is_set():
            found = watcher.read()
            if found is not None:
                checks.append(1)
                if watcher.is_stale(*found):
                    seen_stale.append(time.time())
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        run_plain(tiny_args(data_dir, tmp_path, "--total_steps=3", "--save_step=2"))
    finally:
        done.set()
        thread.join()
    assert slept and len(checks) > 40 and seen_stale == []


def test_resume_auto_waits_out_a_fresh_lock_from_another_host_then_resumes(fake_cifar, tmp_path, monkeypatch, capfd):
    data_dir, _, _ = fake_cifar
    run_plain(tiny_args(data_dir, tmp_path, "--total_steps=2", "--save_step=1"))
    lock = tmp_path / f"otcfm/{PREFIX}.lock"
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "crashed", "heartbeat": time.time()}))
    monkeypatch.setenv(run_lock.STALE_ENV, "1.5")
    with pytest.raises(SystemExit, match="in use by another run .*pid 1 on elsewhere"):
        run_plain(tiny_args(data_dir, tmp_path, "--total_steps=4", "--save_step=1", "--checkpoint_path="
                            f"{tmp_path}/otcfm/{PREFIX}_weights_step_1.pt"))  # no waiting without --resume=auto
    capfd.readouterr()
    start = time.monotonic()
    run_plain(tiny_args(data_dir, tmp_path, "--total_steps=4", "--save_step=1", "--resume=auto"))
    assert time.monotonic() - start > 1.0
    err = capfd.readouterr().err
    assert err.count(f"waiting for {lock}: held by pid 1 on elsewhere") == 1
    assert checkpoint(tmp_path, 3)["step"] == 3 and not lock.exists()
    assert logged_steps(tmp_path / f"otcfm/{PREFIX}_metrics.jsonl") == [0, 1, 2, 3]  # resumed after step 1


@pytest.mark.parametrize("where", ["cfm.io.cifar10.load_cifar10", "cfm.training.loop.ClassConditionedSampler"])
def test_ctrl_c_before_the_training_loop_is_one_line_and_exit_130(fake_cifar, tmp_path, monkeypatch, capsys, where):
    data_dir, _, _ = fake_cifar
    module, _, name = where.rpartition(".")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules[module], name, interrupted)
    with pytest.raises(SystemExit) as exit_:
        run_plain(tiny_args(data_dir, tmp_path, "--total_steps=2"))
    assert exit_.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "interrupted by Ctrl-C outside a training step: the checkpoints already written are intact; run the same "
        "command (with --resume=auto) to continue."]
    assert not (tmp_path / f"otcfm/{PREFIX}.lock").exists()  # released on the way out


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
        try:
            environ = Path(f"/proc/{pid}/environ").read_text()
        except (ProcessLookupError, FileNotFoundError):  # a short-lived child gone between the listing and the read
            continue
        env = dict(item.split("=", 1) for item in environ.split("\0") if "=" in item)
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
         "train_cifar10.py", *tiny_args(data_dir, tmp_path, "--batch_size=8", "--num_subclasses=1", "--total_steps=30",
                                        "--save_step=1000")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path / f"otcfm/{PREFIX}_metrics.jsonl", 2, launcher)
    os.kill(worker_pids(launcher.pid)[1], signal.SIGTERM)
    stdout, stderr = launcher.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    assert launcher.returncode == 0, stderr[-3000:]
    saved = sorted((tmp_path / "otcfm").glob("*.pt"))
    assert len(saved) == 1 and 2 <= torch.load(saved[0], weights_only=True)["step"] < 29
    assert stdout.count("stopped by SIGTERM after step") == 1  # rank 0 alone says it
