"""A hung rank ends a torchrun job within --collective_timeout, naming it; every rank shares the
training-time FID; a save step writes its checkpoint before its grids, which a stop request cuts
short; one rank working alone (a slow save) never trips the timeout. CPU, gloo, subprocesses."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SUBPROCESS_TIMEOUT_S, stand_in_extractor
from test_reliability import PREFIX, start_script, tiny_args, wait_for_step, worker_pids

from cfm.evaluation import fid
from cfm.io import distributed, run_files
from cfm.method import nets

REPO = Path(__file__).resolve().parents[1]
# The scripts' least --collective_timeout (RunConfig's bound): short, yet well above a tiny step on
# a busy 2-core machine (a false alarm would fail the tests).
TIMEOUT_S = 10
ROLL_CALL_S = min(TIMEOUT_S, distributed.ROLL_CALL_CAP.total_seconds())  # rank 0's wait at the roll call
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1"]


def torchrun(script, args, procs=2):
    return subprocess.Popen([*TORCHRUN, f"--nproc_per_node={procs}", str(script), *args], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def exited(pid):
    """Whether process `pid` has ended (gone, or a zombie its parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_until_exited(pids, timeout):
    deadline = time.monotonic() + timeout
    while not all(exited(pid) for pid in pids):
        if time.monotonic() > deadline:
            pytest.fail(f"processes {pids} still run after {timeout} s")
        time.sleep(0.05)


def end(launcher, pids=()):
    """Cleanup: kill the launcher and its workers, if any is left (SIGCONT first: a stopped process
    only dies of SIGKILL). A test that fails leaves no worker waiting for its peers."""
    try:
        pids = {*pids, *worker_pids(launcher.pid).values()}
    except (FileNotFoundError, ProcessLookupError):  # the launcher is gone, and its workers with it
        pass
    for pid in pids:
        for signum in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
    launcher.kill()
    launcher.communicate()


def files(folder):
    """{path: (size, mtime_ns)} of every file under `folder`, but the run's lock: the lock names
    (`{run}.lock`, `{run}.lock.N`) and the holder's own record file (`.{run}.lock.{host}.{pid}.*.tmp`),
    whose mtime is the heartbeat and which the run removes on release: liveness, not output."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).rglob("*")
            if p.is_file() and ".lock" not in p.name}


# ---------------------------------------------------------------------------------- hung rank


def rank_0_exit(launcher, ranks, stopped):
    """(seconds from `stopped` until rank 0 exited, the launcher's stderr), rank 1 (stopped) killed
    after: else torchrun waits 30 s before it kills the stopped rank itself. The wait for rank 0 is
    the measured one: its bound, not SUBPROCESS_TIMEOUT_S (see the assertions on `took`)."""
    wait_until_exited([ranks[0]], timeout=TIMEOUT_S + ROLL_CALL_S + 60)
    took = time.monotonic() - stopped
    os.kill(ranks[1], signal.SIGKILL)
    return took, launcher.communicate(timeout=SUBPROCESS_TIMEOUT_S)[1]



def test_a_stopped_rank_ends_the_job_within_the_timeout_naming_it_and_nothing_is_written_after(fake_cifar, tmp_path):
    data_dir, _, _ = fake_cifar
    run_dir = tmp_path / "otcfm"
    launcher = torchrun("train_cifar10.py", tiny_args(data_dir, tmp_path, "--batch_size=8", "--total_steps=100000",
                                                      "--save_step=3", "--monitor_local=False",
                                                      f"--collective_timeout={TIMEOUT_S}"))
    ranks = {}
    try:
        wait_for_step(run_dir / f"{PREFIX}_metrics.jsonl", 4, launcher)  # past the step-3 checkpoint
        ranks = worker_pids(launcher.pid)
        os.kill(ranks[1], signal.SIGSTOP)
        stopped = time.monotonic()
        time.sleep(1)  # the step in flight may still log: rank 1 finished its part of it
        before = files(tmp_path)
        took, stderr = rank_0_exit(launcher, ranks, stopped)
    finally:
        end(launcher, ranks.values())
    assert launcher.returncode != 0
    # The collective's timeout, the roll call, and a margin for a busy machine: not 30 minutes or 2 hours.
    # This bound is what the test measures, so neither it nor the wait above (which only fails where
    # it would) scales with SUBPROCESS_TIMEOUT_S. Beside the two waits, `took` holds only the rest
    # of a tiny step (a batch of 8; at most a tiny save step), the error line and the process's
    # exit, each well under a second of CPU: 15 s covers a machine several times oversubscribed,
    # while a rank that never timed out would take gloo's default 30 minutes.
    assert took < TIMEOUT_S + ROLL_CALL_S + 15, took
    last = run_files.RunPaths(run_dir, PREFIX).checkpoints_by_step()[-1]
    (line,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: rank 1 stopped answering"), line
    assert f"--collective_timeout={TIMEOUT_S:g} s" in line
    assert f"the last good checkpoint is {last}: resume from it" in line
    assert files(tmp_path) == before  # no checkpoint, metrics line or grid after the stop


STOPPED_BEFORE_THE_LOOP = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from cfm.training import loop

real = loop.{name}


def stopped_first(*args, **kwargs):  # rank 1 stops (SIGSTOP) where it would call {name}
    if os.environ["RANK"] == "1":
        open({pid_file!r}, "w").write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)
    return real(*args, **kwargs)


loop.{name} = stopped_first
from absl import app
import train_cifar10
app.run(train_cifar10.main)
"""


@pytest.mark.parametrize("name", ["init_world", "broadcast_from_main", "build_trainer"])
def test_a_rank_stopped_before_the_loop_ends_the_job_within_the_timeout_naming_it(fake_cifar, tmp_path, name):
    """Rank 1 stops where it would join the process group (the rendezvous), receive the lock's
    verdict (a broadcast), or build DDP (its parameter broadcast): rank 0 exits non-zero within
    --collective_timeout and the roll call, with one sentence naming rank 1, and no step runs."""
    data_dir, _, _ = fake_cifar
    script = tmp_path / "stopped.py"
    script.write_text(STOPPED_BEFORE_THE_LOOP.format(repo=str(REPO), name=name, pid_file=str(tmp_path / "victim.pid")))
    launcher = torchrun(script, tiny_args(data_dir, tmp_path / "out", "--batch_size=8", "--total_steps=3",
                                          "--monitor_local=False", f"--collective_timeout={TIMEOUT_S}"))
    ranks = {}
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while not (tmp_path / "victim.pid").is_file() or len(ranks) < 2:
            assert launcher.poll() is None, launcher.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "rank 1 never reached the stop"
            ranks = worker_pids(launcher.pid)
            time.sleep(0.05)
        stopped = time.monotonic()
        took, stderr = rank_0_exit(launcher, ranks, stopped)
    finally:
        end(launcher, ranks.values())
    assert launcher.returncode != 0
    # As in the loop: the collective's timeout, the roll call, and a margin for a busy machine (rank
    # 0's remaining set-up before the collective is a tiny UNet's construction at most).
    assert took < TIMEOUT_S + ROLL_CALL_S + 15, took
    (line,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: rank 1 stopped answering"), line
    assert f"--collective_timeout={TIMEOUT_S:g} s" in line
    written = [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert not [n for n in written if n.endswith((".pt", ".png"))], written  # no step ran, no save
    metrics = tmp_path / f"out/otcfm/{PREFIX}_metrics.jsonl"
    assert not metrics.is_file() or all("loss" not in r for r in run_files.read_jsonl(metrics))


ROLL_CALL = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
from cfm.io import distributed

world = distributed.init_world("cpu", collective_timeout=2)
distributed.mean_over_ranks(torch.ones(1), world)  # every rank is connected
if world.rank == {victim}:
    open({pid_file!r}, "w").write(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGSTOP)
try:
    with distributed.peers_watched(world, lambda: "nothing written"):
        distributed.mean_over_ranks(torch.ones(1), world)
except distributed.PeerLost as err:
    os.write(1, f"rank {{world.rank}}: {{err}}\\n".encode())  # one write: the ranks share stdout
    sys.exit(1)
"""


@pytest.mark.parametrize("victim", [1, 0])
def test_every_rank_that_answers_names_the_stopped_one_in_the_same_sentence(tmp_path, victim):
    """3 processes: the two that still answer hold a roll call and name the stopped one alike, rank 0
    (which calls the roll) or not."""
    script = tmp_path / "roll_call.py"
    script.write_text(ROLL_CALL.format(repo=str(REPO), victim=victim, pid_file=str(tmp_path / "victim.pid")))
    launcher = torchrun(script, [], procs=3)
    ranks = {}
    try:
        while not (tmp_path / "victim.pid").is_file() or len(ranks) < 3:
            assert launcher.poll() is None, launcher.communicate()[1][-3000:]
            ranks = worker_pids(launcher.pid)
            time.sleep(0.05)
        # Bounded by what is tested, not scaled: the survivors' 2-s collective timeout and roll call,
        # then their exit, idle processes all; 60 s leaves a margin of ten times that.
        wait_until_exited([pid for rank, pid in ranks.items() if rank != victim], timeout=60)
        os.kill(ranks[victim], signal.SIGKILL)
        stdout, _ = launcher.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        end(launcher, ranks.values())
    said = dict(line.split(": ", 1) for line in stdout.splitlines() if line.startswith("rank "))
    assert sorted(said) == [f"rank {r}" for r in range(3) if r != victim]
    assert len(set(said.values())) == 1, said
    assert next(iter(said.values())).startswith(f"rank {victim} stopped answering")
    assert next(iter(said.values())).endswith("; nothing written")


SHARES = """
import os, sys
sys.path.insert(0, {repo!r})
import torch
from cfm.evaluation import sampling
from cfm.io import distributed

class Drift(torch.nn.Module):  # v(t, x) = a: a net with one parameter, on 3x2x2 images
    config = {{"dim": (3, 2, 2)}}

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.5))
    def forward(self, t, x):
        return self.a.expand_as(x)

def fail_on_rank_1(images):
    if world.rank == 1:
        raise RuntimeError("out of memory (stand-in)")

world = distributed.init_world("cpu", collective_timeout=5)
for case, kwargs in [("fails", dict(on_batch=fail_on_rank_1)), ("stopped", dict(stop=lambda: world.rank == 1)),
                     ("fine", dict())]:
    try:
        images, _ = sampling.generate_samples(Drift(), 10, 4, "euler", 2, world=world, **kwargs)
        said = "None" if images is None else tuple(images.shape)
    except Exception as err:
        said = f"{{type(err).__name__}}: {{err}}"
    os.write(1, f"rank {{world.rank}} {{case}}: {{said}}\\n".encode())  # one write: the ranks share stdout
"""


def test_a_share_that_fails_or_is_stopped_on_one_rank_ends_the_split_job_on_every_rank(tmp_path):
    """Rank 1's share raises, then a stop request cuts it short: both ranks raise the same error at
    the gather instead of rank 0 waiting for its results; the job after it runs as usual."""
    script = tmp_path / "shares.py"
    script.write_text(SHARES.format(repo=str(REPO)))
    launcher = torchrun(script, [])
    try:
        stdout, stderr = launcher.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        end(launcher)
    assert launcher.returncode == 0, stderr[-3000:]
    said = dict(line.split(": ", 1) for line in stdout.splitlines() if line.startswith("rank "))
    failed = "ShareFailed: rank 1's share of sampling failed: RuntimeError: out of memory (stand-in)"
    stopped = "SamplingStopped: a stop request cut rank 1's share of sampling short"
    assert said == {"rank 0 fails": failed, "rank 1 fails": failed, "rank 0 stopped": stopped,
                    "rank 1 stopped": stopped, "rank 0 fine": "(10, 3, 2, 2)", "rank 1 fine": "None"}


# --------------------------------------------------------------------- FID split, slow save

RUNNER = """
import os, sys, time
sys.path[:0] = [{repo!r}, {tests!r}]
from cfm.io import distributed
from cfm.evaluation import fid
from cfm.io import checkpoint_io
from conftest import stand_in_extractor


def load_inception(path, device="cpu"):  # the stand-in, counting what each rank featurises
    extract = stand_in_extractor({num_features})
    def counted(images):
        with open(os.path.join({out!r}, "featurised_rank" + os.environ["RANK"]), "a") as f:
            f.write(f"{{len(images)}}\\n")
        return extract(images)
    return counted


real_save = checkpoint_io.atomic_save


def slow_save(obj, path):  # a checkpoint write on a slow file system: longer than --collective_timeout
    time.sleep({sleep})
    return real_save(obj, path)


fid.load_inception = load_inception
checkpoint_io.atomic_save = slow_save
from absl import app
import train_cifar10
app.run(train_cifar10.main)
"""


def test_every_rank_shares_the_training_fid_which_equals_one_process_and_a_slow_save_waits(fake_cifar, tmp_path, one_thread):
    """2 processes: 10 FID samples in batches of 4 (rank 0: samples 0-3 and 8-9, rank 1: 4-7), the
    logged FID that of one process on the EMA weights of the step-2 checkpoint; rank 0's checkpoint
    write lasts longer than --collective_timeout, and the run still ends well."""
    data_dir, images, _ = fake_cifar
    inception = tmp_path / fid.INCEPTION_FILENAME
    inception.write_bytes(b"stand-in")
    mu, sigma = fid.feature_statistics(stand_in_extractor(8)(torch.from_numpy(images)).numpy())  # of the data
    stats = tmp_path / "stats.npz"
    fid.save_statistics(stats, mu, sigma)
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER.format(repo=str(REPO), tests=str(REPO / "tests"), num_features=8, out=str(tmp_path),
                                    sleep=TIMEOUT_S + 3))
    args = tiny_args(data_dir, tmp_path, "--total_steps=3", "--save_step=2", "--monitor_local=False",
                     f"--collective_timeout={TIMEOUT_S}", "--fid_num_gen=10", "--batch_size_fid=4",
                     "--integration_method=euler", "--integration_steps=2", f"--fid_inception_path={inception}",
                     f"--fid_stats_path={stats}")
    launcher = torchrun(runner, args)
    try:
        _, stderr = launcher.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        end(launcher)
    assert launcher.returncode == 0, stderr[-3000:]
    featurised = {rank: [int(n) for n in (tmp_path / f"featurised_rank{rank}").read_text().split()] for rank in (0, 1)}
    assert featurised == {0: [4, 2], 1: [4]}  # whole batches, rank 1 its own
    metrics = [json.loads(line) for line in (tmp_path / f"otcfm/{PREFIX}_metrics.jsonl").read_text().splitlines()]
    (record,) = [r for r in metrics if "fid" in r]
    assert record["step"] == 2 and record["fid_num_gen"] == 10 and record["fid_nfe"] == 2
    ckpt = torch.load(tmp_path / f"otcfm/{PREFIX}_weights_step_2.pt", weights_only=True)
    one_process = fid.FIDScorer(stand_in_extractor(8), mu, sigma).evaluate_net(
        nets.build_net_from_checkpoint(ckpt), 10, 4, "euler", 2, seed=0, progress=False)
    assert record["fid"] == pytest.approx(one_process.fid, rel=1e-9)


# ------------------------------------------------------------------------ checkpoint first


def test_sigterm_during_the_grids_of_a_save_step_keeps_its_checkpoint_and_exits_0(fake_cifar, tmp_path):
    """Grids of 100,000 Euler steps (many minutes): SIGTERM once the step-2 checkpoint exists."""
    data_dir, _, _ = fake_cifar
    run_dir = tmp_path / "otcfm"
    process = start_script(tiny_args(data_dir, tmp_path, "--total_steps=100000", "--save_step=2",
                                     "--grid_steps=100000", "--monitor_local=False"))
    checkpoint = run_dir / f"{PREFIX}_weights_step_2.pt"
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S  # a tiny run reaches step 2 within seconds
    try:
        while not checkpoint.is_file():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, (f"no step-2 checkpoint after {SUBPROCESS_TIMEOUT_S:g} s: "
                                                 "drawn after the grids?")
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        stdout, stderr = process.communicate(timeout=60)  # only fails where the bound below would
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-3000:]
    # Measured, so not scaled: after SIGTERM the run only finishes the grid's Euler step in flight
    # (the tiny net on 4 images), says so and exits: seconds even on a busy machine, while the
    # grids it must not wait for take many minutes.
    assert time.monotonic() - stopped < 30  # not after the grids
    assert torch.load(checkpoint, weights_only=True)["step"] == 2
    assert sorted(p.name for p in run_dir.glob("*.pt")) == [checkpoint.name]  # no second checkpoint
    assert not list(run_dir.glob("*.png"))
    assert ("stop requested during the save of step 2: skipped the normal and ema sample grids "
            "(its checkpoint is written).") in stdout
    assert f"stopped by SIGTERM after step 2: checkpoint {checkpoint}" in stdout
