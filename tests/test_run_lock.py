"""The run lock holds under racing launches: exactly one writer, a heartbeat of its own, atomic takeover.

The races run many cheap processes that import only run_lock (torch-free), started together.
"""

import errno
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import SUBPROCESS_TIMEOUT_S

from cfm.io import atomic_files, errors, run_files
from cfm.method import clustering
from cfm.training import lock_record, run_lock

REPO = Path(__file__).resolve().parents[1]
NAME = "otcfm_cifar10"

# One launch: say it is ready, wait for its go, try the lock, print WON or REFUSED. A winner writes
# what a run writes, each write after a check that it still holds the lock (`verify()`): a fresh
# start's truncation of the metrics file, then 5 lines of its own; it holds its lock until every racer
# has decided (the "end" file), then says whether it still holds it. A racer launched with `where`
# "link" stops before its first `os.link` (taking the lock, or taking a stale one over): it says so
# ("paused.N") and waits for "resume".
RACER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from cfm.training import lock_record, run_lock
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
    open(os.path.join(gate, f"ready.{{number}}"), "w").close()
    wait_for(f"go.{{number}}")
    try:
        lock.acquire()
    except run_lock.RunLocked:
        print("REFUSED", flush=True)
        sys.exit(0)
    print("WON", flush=True)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if lock.verify():
        open(metrics, "w").close()
    for i in range(5):
        if lock.verify():
            with open(metrics, "a") as f:
                f.write(f"{{number}} {{i}}\\n")
    wait_for("end")
    print("HELD" if lock.verify() else "LOST", flush=True)
    lock.release()
""").format(repo=str(REPO), name=NAME)


def race(run_dir, launches):
    """One racer per `where` in `launches` ("none" or "link"). Once all are up, the paused ones go
    first and stop at their point; then the others go together and decide; then the paused ones
    resume and decide; then the round ends. Returns every racer's output, in order. Every racer still
    running when the round fails is killed."""
    gate = Path(tempfile.mkdtemp(prefix="gate", dir=run_dir.parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = []
    try:
        for i, where in enumerate(launches):
            processes.append(subprocess.Popen([sys.executable, "-c", RACER, str(run_dir), str(gate), str(i), where],
                                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))

        def wait_for(names):
            deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
            while not all((gate / name).exists() for name in names):
                assert time.monotonic() < deadline, f"racers never wrote {names}"
                assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
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
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()


def winners(outputs):
    return [i for i, out in enumerate(outputs) if out[:1] == ["WON"]]


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_record(path, age=0.0, **record):
    """A lock record as a run on another host ("elsewhere", pid 1) leaves it, last touched `age` s ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "heartbeat": time.time() - age, **record}))
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def dead_lock(run_dir):
    """The lock a killed run of this host left: its pid is gone."""
    return write_record(run_dir / f"{NAME}.lock", pid=dead_pid(), host=socket.gethostname())


# ------------------------------------------------------------------------------------ races


def test_racing_launches_into_a_dead_runs_lock_leave_exactly_one_writer(tmp_path):
    """8 rounds of 3 simultaneous launches into a folder holding a dead process's lock: one wins and
    holds to the end, the others are refused, and the metrics file holds the winner's lines only; in
    round 0 the first racer pauses before it links (the others take the lock meanwhile)."""
    for round_ in range(8):
        run_dir = tmp_path / f"round{round_}"
        dead_lock(run_dir)
        outputs = race(run_dir, ["link" if round_ == 0 else "none", "none", "none"])
        won = winners(outputs)
        assert len(won) == 1, (round_, outputs)
        assert outputs[won[0]] == ["WON", "HELD"], (round_, outputs)
        assert (run_dir / "metrics.jsonl").read_text().splitlines() == [f"{won[0]} {i}" for i in range(5)]
        assert [p.name for p in run_dir.iterdir()] == ["metrics.jsonl"]  # no lock, temp or aside file stays


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


# ------------------------------------------------------------------------------------ scripted interleavings


class Stop:
    """One point where a thread waits: `reached` once it is there, it goes on when `go` is set."""

    def __init__(self, where):
        self.where, self.reached, self.go = where, threading.Event(), threading.Event()


class Script:
    """Threads of this process (launches, heartbeats) that stop before chosen calls of os.link,
    os.rename, os.replace and os.utime (every step that changes a lock's name or its time) until the
    test lets them go: a review's paused processes, made repeatable. A stop's `where(call, args)`
    picks the call; a thread's stops come in order."""

    CALLS = ("link", "rename", "replace", "utime")

    def __init__(self, monkeypatch):
        self.plans, self.results, self.stops, self.threads = {}, {}, [], []
        for call in self.CALLS:
            monkeypatch.setattr(os, call, self._wrap(call, getattr(os, call)))

    def _wrap(self, call, real):
        def wrapper(*args, **kwargs):
            plan = self.plans.get(threading.current_thread(), [])
            if plan and plan[0].where(call, args):
                stop = plan.pop(0)
                stop.reached.set()
                stop.go.wait(SUBPROCESS_TIMEOUT_S)
            return real(*args, **kwargs)

        return wrapper

    def pause(self, thread, *wheres):
        stops = [Stop(where) for where in wheres]
        self.plans[thread] = stops
        self.stops += stops
        return stops

    def launch(self, lock, *wheres):
        """A thread that calls `lock.acquire()`; its result ("WON", "REFUSED") is `results[lock]`.
        Returns (thread, its stops)."""

        def acquire():
            try:
                lock.acquire()
                self.results[lock] = "WON"
            except run_lock.RunLocked:
                self.results[lock] = "REFUSED"

        thread = threading.Thread(target=acquire)
        stops = self.pause(thread, *wheres)
        self.threads.append(thread)
        thread.start()
        return thread, stops

    @staticmethod
    def reach(stop, thread):
        """Wait until `thread` is at `stop`, or has finished without reaching it."""
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while not stop.reached.wait(0.01) and thread.is_alive():
            assert time.monotonic() < deadline, "the thread never reached its stop"

    def finish(self):
        for stop in self.stops:
            stop.go.set()
        for thread in self.threads:
            thread.join(SUBPROCESS_TIMEOUT_S)


@pytest.fixture
def script(monkeypatch):
    script = Script(monkeypatch)
    try:
        yield script
    finally:
        script.finish()  # a failed test leaves no thread waiting


def takeover(call, args):
    """The step by which a taker replaces a stale lock: a link to a numbered generation
    (`{name}.lock.N`), or a rename of the lock name (aside)."""
    if call == "link":
        return re.fullmatch(rf"{re.escape(NAME)}\.lock\.\d+", Path(args[1]).name) is not None
    return call == "rename" and Path(args[0]).name == f"{NAME}.lock"


def any_link(call, args):
    return call == "link"


def a_write(call, args):
    """A heartbeat's write: touching its file, or replacing the lock's contents."""
    return call in ("utime", "replace")


def writers(locks):
    """The locks whose holder would write now (each write is preceded by `verify()`)."""
    return [lock for lock in locks if lock.verify()]


def on_another_host(lock):
    lock.record["host"] = "elsewhere"  # judges by the lock's age, as another node does
    return lock


def release_all(locks):
    for lock in locks:
        lock.release()


def test_a_late_heartbeat_after_a_takeover_never_lands_on_the_new_owners_lock(tmp_path, script):
    """(a) A's heartbeat hangs in its write (an NFS stall) past the stale limit; B, on another host,
    takes the lock over; then A's write lands. B alone writes from then on, and the lock names B."""
    a = run_lock.RunLock(tmp_path, NAME, stale_after=0.6)
    b = on_another_host(run_lock.RunLock(tmp_path, NAME, stale_after=0.6))
    try:
        a.acquire()
        [stalled] = script.pause(a._thread, a_write)
        assert stalled.reached.wait(SUBPROCESS_TIMEOUT_S)
        b.acquire(wait=True)  # once A's lock is stale
        stalled.go.set()
        time.sleep(0.4)  # A's late write lands, and a few of its beats go by
        assert writers([a, b]) == [b]
        assert b.owner()["token"] == b.token
        assert "another run" in a.lost_message() and "on elsewhere" in a.lost_message()
    finally:
        release_all([b, a])
    assert list(tmp_path.iterdir()) == []


def test_three_launches_racing_for_a_dead_runs_lock_leave_one_writer(tmp_path, script):
    """(b) L2 judges a dead process's lock stale and stops before taking it over; L1 takes it; L2's
    takeover step runs and L2 stops again before its next link; L3 launches; L2 goes on. Exactly one
    launch returns from acquire(), and it alone writes."""
    dead_lock(tmp_path)
    locks = [run_lock.RunLock(tmp_path, NAME, stale_after=3) for _ in range(3)]
    try:
        second, (judged, moved) = script.launch(locks[1], takeover, any_link)
        Script.reach(judged, second)
        first, _ = script.launch(locks[0])
        first.join()
        judged.go.set()
        Script.reach(moved, second)
        third, _ = script.launch(locks[2])
        third.join()
        moved.go.set()
        second.join()
        assert [script.results[lock] for lock in locks] == ["WON", "REFUSED", "REFUSED"]
        assert writers(locks) == [locks[0]]
    finally:
        release_all(locks)
    assert list(tmp_path.iterdir()) == []


def test_two_takers_of_one_stale_lock_and_a_launch_between_leave_one_writer(tmp_path, script):
    """(c) T2 judges a dead process's lock stale and stops before taking it over; T1 takes it, works
    and releases it; T3 takes the free lock; then T2's takeover step runs. T1 alone wrote while it
    held the lock, T3 alone writes after."""
    dead_lock(tmp_path)
    locks = [run_lock.RunLock(tmp_path, NAME, stale_after=3) for _ in range(3)]
    try:
        second, (judged,) = script.launch(locks[1], takeover)
        Script.reach(judged, second)
        first, _ = script.launch(locks[0])
        first.join()
        assert script.results[locks[0]] == "WON" and writers(locks) == [locks[0]]
        locks[0].release()
        third, _ = script.launch(locks[2])
        third.join()
        judged.go.set()
        second.join()
        assert [script.results[lock] for lock in locks] == ["WON", "REFUSED", "WON"]
        assert writers(locks) == [locks[2]]
    finally:
        release_all(locks)
    assert list(tmp_path.iterdir()) == []


def test_a_heartbeat_that_keeps_failing_stops_the_writes_before_the_lock_looks_stale(tmp_path, monkeypatch,
                                                                                    capsys):
    """(d) Every heartbeat fails (ESTALE: a file system gone away). The thread survives the first
    failures and warns; after half the stale limit of failures the run stops writing, with one
    sentence, before another host could take the lock over."""
    lock = run_lock.RunLock(tmp_path, NAME, stale_after=1.2)
    watcher = on_another_host(run_lock.RunLock(tmp_path, NAME, stale_after=1.2))
    lock.acquire()
    beat = lock._thread
    real_open, real_utime, real_replace = open, os.utime, os.replace

    def failing(real):
        def call(*args, **kwargs):
            if threading.current_thread() is beat:
                raise OSError(errno.ESTALE, "Stale file handle")
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr("builtins.open", failing(real_open))
    monkeypatch.setattr(os, "utime", failing(real_utime))
    monkeypatch.setattr(os, "replace", failing(real_replace))
    start, both = time.monotonic(), []
    try:
        time.sleep(0.35)  # one or two failed beats
        assert lock.verify() and beat.is_alive()
        while time.monotonic() - start < 2.0:
            found = watcher.read()
            if lock.verify() and found is not None and watcher.is_stale(*found):
                both.append(time.monotonic() - start)
            time.sleep(0.02)
        assert both == []  # never a writer while another host may take the lock
        assert not lock.verify() and lock.lost
        assert "heartbeat" in lock.lost_message() and "Stale file handle" in lock.lost_message()
        assert f"warning: heartbeat of {lock.path} failed" in capsys.readouterr().err
    finally:
        monkeypatch.undo()
        lock.release()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's end, on purpose
def test_a_dead_heartbeat_thread_is_a_lost_lock(tmp_path, monkeypatch):
    """(e) Whatever ends the heartbeat thread, the run knows: its lock counts as lost, with a sentence."""
    lock = run_lock.RunLock(tmp_path, NAME, stale_after=0.6)
    lock.acquire()
    beat = lock._thread
    real_open, real_utime, real_replace = open, os.utime, os.replace

    def ending(real):
        def call(*args, **kwargs):
            if threading.current_thread() is beat:
                raise SystemExit(1)  # not an Exception: nothing catches it
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr("builtins.open", ending(real_open))
    monkeypatch.setattr(os, "utime", ending(real_utime))
    monkeypatch.setattr(os, "replace", ending(real_replace))
    beat.join(SUBPROCESS_TIMEOUT_S)
    monkeypatch.undo()
    assert lock.lost and not lock.verify()
    assert "heartbeat" in lock.lost_message()
    lock.release()


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
        "silent other host": {"age": lock_record.DEFAULT_STALE_AFTER + 1},
    }
    for why, record in stale.items():
        write_record(first.path, **record)
        taker = run_lock.RunLock(tmp_path, NAME)
        assert taker.acquire()["pid"] == record.get("pid", 1), why
        assert taker.owner()["token"] == taker.token
        taker.release()
        assert list(tmp_path.iterdir()) == [], why  # the stale lock went with the takeover
    write_record(first.path, age=5)
    with pytest.raises(run_lock.RunLocked, match="pid 1 on elsewhere, last heartbeat 5 s ago"):
        run_lock.RunLock(tmp_path, NAME).acquire()


def test_a_holder_in_another_pid_namespace_is_live_while_its_file_is_flocked(tmp_path):
    """Containers sharing a host name but not a pid namespace: the holder's pid means nothing here
    (it names no process of ours), but its file stays flock'ed while it lives."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from cfm.training import lock_record, run_lock
        lock = run_lock.RunLock({str(tmp_path)!r}, {NAME!r})
        lock.record["pid"] = {dead_pid()}  # its pid as another namespace numbers it
        lock.acquire()
        print("HELD", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "HELD"
        with pytest.raises(run_lock.RunLocked, match="in use by another run"):
            run_lock.RunLock(tmp_path, NAME).acquire()
    finally:
        holder.kill()
        holder.wait()
    taker = run_lock.RunLock(tmp_path, NAME)  # killed: its flock went with it
    assert taker.acquire() is not None
    taker.release()


@pytest.mark.parametrize("field, value, problem", [
    ("pid", "12x", "its pid '12x' is not a whole number"),
    ("heartbeat", "soon", "its heartbeat 'soon' is not a number"),
    ("host", 7, "its host 7 is not a name"),
])
def test_a_hand_edited_record_is_one_sentence_and_nothing_is_written(tmp_path, field, value, problem):
    lock_path = write_record(tmp_path / f"{NAME}.lock", **{field: value})
    before = lock_path.read_bytes()
    with pytest.raises(run_lock.UserError) as refused:
        run_lock.RunLock(tmp_path, NAME).acquire()
    assert str(refused.value) == (f"{lock_path} holds a lock record that no run of this program wrote ({problem}): "
                                  f"if no run of {NAME} is alive, delete it and run again.")
    assert [p.name for p in tmp_path.iterdir()] == [lock_path.name] and lock_path.read_bytes() == before


def test_the_heartbeat_thread_keeps_the_lock_fresh_while_the_caller_is_busy(tmp_path):
    """Nothing but the thread refreshes the lock: a holder that sleeps through 4 stale limits still
    looks alive to another host at every moment."""
    holder = run_lock.RunLock(tmp_path, NAME, stale_after=0.6)
    holder.acquire()
    watcher = on_another_host(run_lock.RunLock(tmp_path, NAME, stale_after=0.6))
    first = watcher.read()[1]
    deadline = time.time() + 2.4
    while time.time() < deadline:  # the holder's own thread is busy with nothing: a long save step
        raw, mtime = watcher.read()
        assert not watcher.is_stale(raw, mtime)
        time.sleep(0.05)
    assert watcher.read()[1] > first + 1.5
    holder.release()


def test_a_lock_replaced_by_hand_is_lost_and_left_alone(tmp_path):
    holder = run_lock.RunLock(tmp_path, NAME, stale_after=0.6)
    holder.acquire()
    assert holder.verify()
    taken = {"pid": 1, "host": "elsewhere", "token": "another run's"}
    atomic_files.atomic_write(holder.path, lambda f: f.write(json.dumps(taken).encode()))
    time.sleep(0.4)  # a few heartbeats
    assert holder.lost and not holder.verify()
    assert json.loads(holder.path.read_text())["token"] == "another run's"  # never overwritten
    assert "taken over by another run" in holder.lost_message() and "(pid 1 on elsewhere" in holder.lost_message()
    holder.release()
    assert [p.name for p in tmp_path.iterdir()] == [holder.path.name]  # not its lock to remove


def test_a_requeue_waits_for_a_fresh_foreign_lock_and_takes_it_once_stale(tmp_path, capsys):
    write_record(tmp_path / f"{NAME}.lock")
    lock = run_lock.RunLock(tmp_path, NAME, stale_after=1.0)
    with pytest.raises(run_lock.RunLocked):
        lock.acquire()  # without waiting: refused
    start = time.monotonic()
    assert lock.acquire(wait=True)["host"] == "elsewhere"
    assert 0.9 < time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert err.count("waiting for") == 1 and "held by pid 1 on elsewhere" in err
    lock.release()


def test_a_full_disk_is_one_sentence_for_the_lock(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    lock = run_lock.RunLock(tmp_path, NAME, stale_after=0.6)
    monkeypatch.setattr(run_lock, "temp_file", full)
    with pytest.raises(errors.SaveError, match=rf"cannot write {lock.path} \(No space left on device\)"):
        lock.acquire()


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
