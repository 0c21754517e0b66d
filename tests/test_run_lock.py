"""The run lock holds under racing launches: exactly one writer, a heartbeat of its own, atomic takeover.

The races run many cheap processes that import only run_lock (torch-free), started together.
"""

import errno
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from conftest import SUBPROCESS_TIMEOUT_S

from cfm.io import atomic_files, run_files
from cfm.method import clustering
from cfm.training import run_lock

REPO = Path(__file__).resolve().parents[1]
NAME = "otcfm_cifar10"

# One launch: say it is ready, wait for its go, try the lock, print WON or REFUSED; a winner holds its
# lock until every racer has decided (the "end" file), then says whether it still holds it. A racer
# launched with `where` "link" stops between writing its record and linking it, one with "take"
# between judging a lock stale and taking it: it says so ("paused.N") and waits for "resume".
RACER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from cfm.training import run_lock
    run_dir, gate, number, where = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    lock = run_lock.RunLock(run_dir, {name!r}, stale_after=30)

    def wait_for(name):
        while not os.path.exists(os.path.join(gate, name)):
            time.sleep(0.001)

    def paused(function):
        def wrapper(*args):
            open(os.path.join(gate, f"paused.{{number}}"), "w").close()
            wait_for("resume")
            return function(*args)
        return wrapper

    if where == "link":
        run_lock.os.link = paused(run_lock.os.link)
    if where == "take":
        lock._remove_stale = paused(lock._remove_stale)
    open(os.path.join(gate, f"ready.{{number}}"), "w").close()
    wait_for(f"go.{{number}}")
    try:
        lock.acquire()
    except run_lock.RunLocked:
        print("REFUSED", flush=True)
        sys.exit(0)
    print("WON", flush=True)
    wait_for("end")
    print("HELD" if lock.verify() else "LOST", flush=True)
    lock.release()
""").format(repo=str(REPO), name=NAME)


def race(run_dir, launches):
    """One racer per `where` in `launches` ("none", "link" or "take"). Once all are up, the paused ones
    go first and stop at their point; then the others go together and decide; then the paused ones
    resume and decide; then the round ends. Returns every racer's output, in order."""
    gate = Path(tempfile.mkdtemp(prefix="gate", dir=run_dir.parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, "-c", RACER, str(run_dir), str(gate), str(i), where],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i, where in enumerate(launches)]

    def wait_for(names):
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while not all((gate / name).exists() for name in names):
            assert time.monotonic() < deadline, f"racers never wrote {names}"
            time.sleep(0.005)

    wait_for([f"ready.{i}" for i in range(len(launches))])
    paused = [i for i, where in enumerate(launches) if where != "none"]
    others = [i for i, where in enumerate(launches) if where == "none"]
    for i in paused:
        (gate / f"go.{i}").touch()
    wait_for([f"paused.{i}" for i in paused])
    for i in others:
        (gate / f"go.{i}").touch()
    decisions = {i: processes[i].stdout.readline().split() for i in others}
    (gate / "resume").touch()
    decisions.update({i: processes[i].stdout.readline().split() for i in paused})
    (gate / "end").touch()
    outputs = []
    for i, process in enumerate(processes):
        stdout, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        assert process.returncode == 0, stderr
        outputs.append(decisions[i] + stdout.split())
    return outputs


def winners(outputs):
    return [i for i, out in enumerate(outputs) if out[:1] == ["WON"]]


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_record(path, **record):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "heartbeat": time.time(), **record}))


# ------------------------------------------------------------------------------------ races


def test_racing_launches_have_exactly_one_winner(tmp_path):
    """20 rounds of 3 simultaneous launches into one run folder: one wins and holds to the end,
    the others are refused; in round 0 the first racer pauses between writing its record and
    linking it, in round 1 the folder starts with a stale lock (a dead pid)."""
    for round_ in range(20):
        run_dir = tmp_path / f"round{round_}"
        launches = ["none"] * 3
        if round_ == 0:
            launches = ["link", "none", "none"]
        if round_ == 1:
            write_record(run_dir / f"{NAME}.lock", pid=dead_pid(), host=socket.gethostname())
        outputs = race(run_dir, launches)
        won = winners(outputs)
        assert len(won) == 1, (round_, outputs)
        assert outputs[won[0]] == ["WON", "HELD"], (round_, outputs)
        assert not (run_dir / f"{NAME}.lock").exists()  # released by its holder
        assert [p.name for p in run_dir.iterdir()] == []  # no temp or aside file stays


def test_of_two_takers_of_a_stale_lock_exactly_one_wins(tmp_path):
    """A taker paused between judging the lock stale and taking it must not take the lock that the
    other taker linked meanwhile."""
    for round_ in range(3):
        run_dir = tmp_path / f"round{round_}"
        write_record(run_dir / f"{NAME}.lock", pid=dead_pid(), host=socket.gethostname())
        outputs = race(run_dir, ["take", "none", "none"])
        won = winners(outputs)
        assert won != [0] and len(won) == 1, outputs  # the paused taker came too late
        assert outputs[won[0]] == ["WON", "HELD"], outputs


def test_a_young_empty_lock_is_live_and_an_old_one_is_stale(tmp_path):
    """An empty lock (a creator paused before filling it, as older versions could leave) is not
    taken over within the grace period; after it, exactly one racer takes it."""
    lock_path = tmp_path / "run" / f"{NAME}.lock"
    lock_path.parent.mkdir()
    lock_path.write_bytes(b"")
    outputs = race(tmp_path / "run", ["none"] * 3)
    assert winners(outputs) == [], outputs
    old = time.time() - 31  # older than the grace period (30 s: the racers' stale limit)
    os.utime(lock_path, (old, old))
    outputs = race(tmp_path / "run", ["none"] * 3)
    assert len(winners(outputs)) == 1, outputs


# ------------------------------------------------------------------------------------ one process


def test_a_live_lock_is_refused_and_stale_ones_are_taken_over(tmp_path):
    first = run_lock.RunLock(tmp_path, NAME)
    assert first.acquire() is None
    with pytest.raises(run_lock.RunLocked, match=rf"in use by another run of {NAME} \(pid {os.getpid()} on "):
        run_lock.RunLock(tmp_path, NAME).acquire()
    other_name = run_lock.RunLock(tmp_path, f"{NAME}_anchor_1e0")
    assert other_name.acquire() is None  # another run name: its own lock
    other_name.release()
    first.release()

    stale = {
        "dead pid on this host": {"pid": dead_pid(), "host": socket.gethostname()},
        "silent other host": {"heartbeat": time.time() - run_lock.DEFAULT_STALE_AFTER - 1},
    }
    for why, record in stale.items():
        write_record(first.path, **record)
        taker = run_lock.RunLock(tmp_path, NAME)
        assert taker.acquire()["pid"] == record.get("pid", 1), why
        assert json.loads(first.path.read_text())["token"] == taker.token
        taker.release()
    write_record(first.path, heartbeat=time.time() - 5)
    with pytest.raises(run_lock.RunLocked, match="pid 1 on elsewhere, last heartbeat 5 s ago"):
        run_lock.RunLock(tmp_path, NAME).acquire()


def test_the_heartbeat_thread_keeps_the_lock_fresh_while_the_caller_is_busy(tmp_path):
    """Nothing but the thread refreshes the lock: a holder that sleeps through 4 stale limits still
    looks alive to another host at every moment."""
    holder = run_lock.RunLock(tmp_path, NAME, stale_after=0.6)
    holder.acquire()
    watcher = run_lock.RunLock(tmp_path, NAME, stale_after=0.6)
    watcher.record["host"] = "elsewhere"  # judges by the heartbeat, as another node would
    first = holder.owner()["heartbeat"]
    deadline = time.time() + 2.4
    while time.time() < deadline:  # the holder's own thread is busy with nothing: a long save step
        raw, mtime = watcher.read()
        assert not watcher.is_stale(raw, mtime)
        time.sleep(0.05)
    assert holder.owner()["heartbeat"] > first + 1.5
    holder.release()


def test_a_lock_taken_over_is_lost_at_the_next_heartbeat(tmp_path):
    holder = run_lock.RunLock(tmp_path, NAME, stale_after=0.6)
    holder.acquire()
    assert holder.verify()
    write_record(holder.path, token="another run's")  # what a taker on another node writes
    time.sleep(0.4)  # a few heartbeats
    assert holder.lost and not holder.verify()
    assert json.loads(holder.path.read_text())["token"] == "another run's"  # the heartbeat never overwrote it
    assert "another run took over" in holder.lost_message()
    holder.release()
    assert holder.path.exists()  # not its lock to remove


def test_a_requeue_waits_for_a_fresh_foreign_lock_and_takes_it_once_stale(tmp_path, capsys):
    write_record(tmp_path / f"{NAME}.lock", heartbeat=time.time())
    lock = run_lock.RunLock(tmp_path, NAME, stale_after=1.0)
    with pytest.raises(run_lock.RunLocked):
        lock.acquire()  # without waiting: refused
    start = time.monotonic()
    assert lock.acquire(wait=True)["host"] == "elsewhere"
    assert 0.9 < time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert err.count("waiting for") == 1 and "held by pid 1 on elsewhere" in err
    lock.release()


def test_a_full_disk_is_one_sentence_for_the_lock_and_a_warning_for_the_heartbeat(tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    lock = run_lock.RunLock(tmp_path, NAME, stale_after=0.6)
    with monkeypatch.context() as m:
        m.setattr(run_lock, "temp_file", full)
        with pytest.raises(run_lock.SaveError, match=rf"cannot write {lock.path} \(No space left on device\)"):
            lock.acquire()
    lock.acquire()
    monkeypatch.setattr(run_lock, "atomic_write", full)
    time.sleep(0.35)
    err = capsys.readouterr().err
    assert f"warning: heartbeat of {lock.path} failed: cannot write {lock.path} (No space left on device)" in err
    assert lock.verify() and lock._thread.is_alive()  # still held, still beating
    lock.release()


def test_the_stale_limit_setting(monkeypatch):
    monkeypatch.setenv(run_lock.STALE_ENV, "240")
    assert run_lock.RunLock("x", NAME).stale_after == 240
    monkeypatch.setenv(run_lock.STALE_ENV, "soon")
    with pytest.raises(run_lock.UserError, match=r"\$CFM_LOCK_STALE_AFTER='soon' is not a positive number"):
        run_lock.RunLock("x", NAME)


def test_run_lock_imports_no_torch():
    code = "import sys; from cfm.training import run_lock; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ------------------------------------------------------------------------------------ temp files


def test_temp_files_name_their_writer_and_dead_writers_files_go(tmp_path):
    fd, mine = atomic_files.temp_file(tmp_path / "cache.npz")
    os.close(fd)
    assert atomic_files.temp_owner(mine) == (atomic_files.HOST, os.getpid())
    dead = tmp_path / f".cache.npz.{atomic_files.HOST}.{dead_pid()}.abc123.tmp"
    foreign = tmp_path / f".cache.npz.otherhost.{os.getpid()}.abc123.tmp"
    live = tmp_path / f".cache.npz.{atomic_files.HOST}.{os.getppid()}.abc123.tmp"
    for path in (dead, foreign, live):
        path.write_bytes(b"x")
    # A shared cache: only the dead pid's file goes (this process's own is live too).
    assert atomic_files.remove_stale_temp_files(tmp_path, ["cache.npz"]) == [dead]
    # Files of a run whose lock the caller holds: every writer's goes.
    assert sorted(atomic_files.remove_stale_temp_files(tmp_path, ["cache.npz"], held_by_this_run=True)) == \
        sorted([mine, foreign, live])


def test_a_lock_racer_temp_file_survives_the_holders_clean_up(tmp_path):
    """The holder removes its run's stale temp files, but not a live racer's lock temp file."""

    racer = tmp_path / f".{NAME}.lock.{atomic_files.HOST}.{os.getppid()}.abc.tmp"
    killed = tmp_path / f".{NAME}.lock.{atomic_files.HOST}.{dead_pid()}.abc.tmp"
    checkpoint = tmp_path / f".{NAME}_weights_step_20.pt.otherhost.12.abc.tmp"
    for path in (racer, killed, checkpoint):
        path.write_bytes(b"x")
    assert sorted(run_files.RunPaths(tmp_path, NAME).remove_stale_temp_files()) == sorted([checkpoint, killed])
    assert racer.exists()


def test_shared_caches_remove_a_dead_writers_temp_file_and_keep_another_hosts(tmp_path):
    """The K-means cache and the FID statistics: a temp file of a dead pid on this host goes when the
    cache is written; one from another host stays (a run there may be writing it)."""
    import numpy as np
    import torch

    from cfm.evaluation import fid

    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(40) % 10
    digest = clustering.data_digest(images, labels)
    kmeans = clustering.cache_path(tmp_path, digest, 2, 0, "lloyd")
    stats = tmp_path / "stats.npz"
    pid = dead_pid()
    for target in (kmeans, stats):
        killed = target.with_name(f".{target.name}.{atomic_files.HOST}.{pid}.abc.tmp")
        elsewhere = target.with_name(f".{target.name}.otherhost.{pid}.abc.tmp")
        killed.write_bytes(b"x")
        elsewhere.write_bytes(b"x")
    clustering.cluster_assignments(images, labels, 2, seed=0, cache_dir=tmp_path, algorithm="lloyd")
    fid.save_statistics(stats, np.zeros(2), np.eye(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [kmeans.name, stats.name, f".{kmeans.name}.otherhost.{pid}.abc.tmp", f".{stats.name}.otherhost.{pid}.abc.tmp"])
