"""One distributed code path: a plain `python script.py` is a world of size 1, `torchrun` a world
of one process per GPU (or per CPU process, with gloo). Every rank computes; only rank 0 writes.

World-size invariance: every rank draws the whole global batch from streams shared by all ranks
(the same seed everywhere), so all ranks hold identical global tensors, and each rank trains on its
own contiguous block of rows (`own_rows`). DDP averages the blocks' gradients, which is the
gradient of the global mean loss: N processes train exactly what one process trains.

Hung ranks. The training collectives (the main group, and the gloo group that agrees on stop
signals) wait `--collective_timeout` (a few minutes) for a rank that stopped answering. When one
fails that way, the ranks that still answer hold a roll call on a gloo group of its own
(`roll_call`), so that every one of them exits with the same sentence naming the missing rank
(`PeerLost`), on the CPU and the GPU alike. The training loop watches its set-up (the lock's
verdict, DDP's construction, the FID's gathers) the same way, and a rank that never joins the
process group is named from the rendezvous store (`check_in_at_rendezvous`). Where one rank works
alone on purpose, the others wait for it in the long-wait group (`wait_for_main`, `wait_for_all`:
up to `LONG_WAIT`), never in the training collectives:
    - the CIFAR-10 download / extraction, the K-means clustering and its cluster grids, and the FID
      files (download, or the reference statistics computed once): `main_first`, rank 0;
    - the start of rank 0's logger (wandb), and the checkpoint and sample grids of a save step: rank 0;
    - the last batch of a split sampling job (the FID): the ranks that finished wait for the rest.
Everything else one rank does alone is short by design: a metrics line, the lock's heartbeat, the
stop line. gloo groups live on the CPU, so no GPU stream is synchronised for any of this.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from cfm.io.errors import UserError

# The training collectives' default: a step takes well under a second on a GPU, so a rank silent
# for minutes is lost. `--collective_timeout` sets it; the evaluation scripts keep this default.
DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0
# The longest one rank may work alone while the others wait (a CIFAR-10 download over a slow link,
# the FID reference statistics computed from 50,000 images, the sample grids on a slow device).
LONG_WAIT = datetime.timedelta(hours=1)
# How long rank 0 waits for the others at a roll call. The ranks that still answer reach it within
# about one step of each other: each gave up on the same collective (or on the next one).
ROLL_CALL_CAP = datetime.timedelta(seconds=30)


@dataclass
class SideGroups:
    """gloo groups on the CPU beside the training group, one per purpose: a gloo group is unusable
    once one of its operations timed out, and its ranks other than 0 wait as long as the group's
    timeout (a per-call timeout binds rank 0 only).

    signals:   the stop-flag all-reduce after every step (timeout: the collective timeout T)
    roll_call: who still answers once a collective failed (2 R: rank 0 calls it for R = min(T, 30 s))
    long_wait: the others wait here while one rank works alone (`LONG_WAIT`)
    verdicts:  rank 0 tells the ranks that answered which did not (`LONG_WAIT`)
    """

    signals: object
    roll_call: object
    long_wait: object
    verdicts: object


@dataclass
class World:
    rank: int
    size: int
    device: torch.device
    timeout: datetime.timedelta = datetime.timedelta(seconds=DEFAULT_COLLECTIVE_TIMEOUT_S)
    side: SideGroups | None = None  # made by init_world when size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def roll_call_timeout(self) -> datetime.timedelta:
        return min(self.timeout, ROLL_CALL_CAP)


def process_rank() -> int:
    """This process's rank: the process group's if one is joined, else torchrun's $RANK, else 0.

    For code deep in a helper with no World at hand (a progress bar that only rank 0 draws).
    """
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def main_group_timeout(backend: str, timeout: datetime.timedelta) -> datetime.timedelta:
    """The main group's timeout: T for gloo. NCCL's watchdog aborts a process whose collective ran
    past the group's timeout without naming the rank that did not answer; it gets the roll call's
    time and a minute on top, so that on a GPU (where a healthy rank's host thread runs ahead of the
    device and waits in the gloo stop-flag all-reduce) the roll call speaks first."""
    if backend != "nccl":
        return timeout
    return timeout + 2 * min(timeout, ROLL_CALL_CAP) + datetime.timedelta(minutes=1)


def init_world(device_flag: str, collective_timeout: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> World:
    """Join the torchrun process group if launched by torchrun; pick this rank's device.

    `collective_timeout` (seconds) bounds how long a collective waits for a rank that stopped
    answering: the main group's (see `main_group_timeout`) and the stop-signal group's timeout.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    timeout = datetime.timedelta(seconds=collective_timeout)
    device = resolve_device(device_flag)
    if device.type == "cuda":
        if size > 1:  # one GPU per process, as torchrun lays them out
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    world = World(rank=rank, size=size, device=device, timeout=timeout)
    if size > 1:
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            group_timeout = main_group_timeout(backend, timeout)
            # What init_process_group does with env:// (torchrun's variables), but for the check-in
            # on its store, which names a rank that never comes (torch's own wait names only a key).
            store, _, _ = next(dist.rendezvous("env://", rank, size, timeout=group_timeout))
            store.set_timeout(group_timeout)
            check_in_at_rendezvous(store, world)
            dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank, world_size=size,
                                    timeout=group_timeout)
            if backend == "gloo":
                # A process that exits with gloo groups alive can abort in their C++ destructors
                # ("terminate called without an active exception"), turning a clean exit into a
                # crash that torchrun reports; tearing them down first is local (no collective).
                atexit.register(dist.destroy_process_group)
        # new_group is collective: every rank makes the same groups in the same order.
        world.side = SideGroups(
            signals=dist.new_group(backend="gloo", timeout=timeout),
            roll_call=dist.new_group(backend="gloo", timeout=2 * world.roll_call_timeout),
            long_wait=dist.new_group(backend="gloo", timeout=LONG_WAIT),
            verdicts=dist.new_group(backend="gloo", timeout=LONG_WAIT),
        )
    return world


class PeerLost(UserError):
    """A collective failed because another rank stopped answering (it died, hung or was stopped),
    or, when every rank still answers, because one was slower than the collective timeout. Every
    rank that still answers raises it with the same sentence, and exits without writing."""


def _seconds(delta: datetime.timedelta) -> str:
    return f"{delta.total_seconds():g} s"


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def check_in_at_rendezvous(store: dist.Store, world: World) -> None:
    """Every rank sets its key on the rendezvous store, then waits up to the collective timeout for
    every other rank's: raises PeerLost naming the ranks whose key is missing (the same list on every
    rank that came, but for a rank arriving just as the others give up). A rank that hangs before
    it joins (in CUDA's start-up, say) thus ends the job like one that hangs later, with no roll call:
    the store saw who came. The rest of `init_world` only makes the process groups.
    """
    # Per launch: torchrun's store outlives a restart of the workers (--max-restarts).
    prefix = f"cfm/rendezvous/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    store.set(f"{prefix}{world.rank}", "here")
    keys = [f"{prefix}{rank}" for rank in range(world.size)]
    try:
        store.wait(keys, world.timeout)
    except dist.DistStoreError:  # the wait timed out: the store knows who came
        missing = [rank for rank, key in enumerate(keys) if not store.check([key])]
        if not missing:  # every rank came after all, just as the wait gave up
            return
        it = "it" if len(missing) == 1 else "they"
        raise PeerLost(f"{_ranks(missing)} stopped answering (a dead, hung or stopped process): {it} did not join the "
                       f"process group within --collective_timeout={_seconds(world.timeout)} of this rank") from None


def _check_in(world: World, group, main_waits: datetime.timedelta) -> list[int]:
    """The ranks that did not check in with rank 0 within `main_waits` of its arrival: the same
    sorted list on every rank that checked in ([0] on a rank whose rank 0 never took its check-in).

    Every rank but 0 sends its number to rank 0 on `group`, waiting for rank 0 up to the group's
    timeout, then receives rank 0's verdict. Rank 0 takes the numbers as they come (from any
    source) until all are in or `main_waits` has passed. Its wait timing out leaves `group`
    unusable (gloo), so the verdict goes out on a group of its own.
    """
    verdict = torch.zeros(world.size, dtype=torch.int32)  # 1 marks a missing rank
    if not world.is_main:
        try:
            dist.send(torch.tensor([world.rank], dtype=torch.int32), dst=0, group=group)
            dist.recv(verdict, src=0, group=world.side.verdicts)
        except RuntimeError:  # rank 0 did not take the check-in in time, or closed the connection
            return [0]
        return verdict.nonzero().flatten().tolist()
    deadline = time.monotonic() + main_waits.total_seconds()
    present = set()
    while len(present) < world.size - 1:
        number = torch.zeros(1, dtype=torch.int32)
        remaining = datetime.timedelta(seconds=max(deadline - time.monotonic(), 1e-3))
        try:
            dist.irecv(number, src=None, group=group).wait(timeout=remaining)
        except RuntimeError:  # the deadline passed (or a peer's connection broke)
            break
        present.add(int(number))
    missing = sorted(set(range(1, world.size)) - present)
    verdict[missing] = 1
    for rank in sorted(present):
        dist.send(verdict, dst=rank, group=world.side.verdicts)
    return missing


def roll_call(world: World) -> list[int]:
    """After a collective failed: the ranks that do not answer within the roll-call time, the same
    list on every rank that answers ([] when every rank answers). Every rank whose collective
    failed calls it; they get there within about a step of each other."""
    return _check_in(world, world.side.roll_call, world.roll_call_timeout)


def is_collective_failure(err: BaseException) -> bool:
    """Whether `err` is a collective that failed (timed out, or lost its connection to a peer):
    NCCL and the c10d layer raise DistError subclasses; gloo raises plain RuntimeErrors that
    name its transport."""
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and "gloo" in str(err))


def peer_lost(world: World, err: BaseException) -> PeerLost:
    """The PeerLost a failed collective `err` amounts to, after a roll call names who is missing."""
    missing = roll_call(world)
    if not missing:
        return PeerLost(
            f"a collective failed ({type(err).__name__}) although every rank answered the roll call after it: a rank "
            f"was slower than --collective_timeout={_seconds(world.timeout)} (raise it)"
        )
    it = "it" if len(missing) == 1 else "them"
    return PeerLost(
        f"{_ranks(missing)} stopped answering (a dead, hung or stopped process): a collective waited "
        f"--collective_timeout={_seconds(world.timeout)} for {it}, and the roll call that followed went unanswered"
    )


@contextlib.contextmanager
def peers_watched(world: World, epilogue: Callable[[], str] | None = None):
    """Turn a collective that fails in the block into `PeerLost` naming the rank that stopped
    answering (see `roll_call`); other errors pass through. `epilogue()`, if given, ends the
    sentence of any PeerLost leaving the block (e.g. which checkpoint to resume from)."""
    try:
        yield
    except Exception as err:
        if world.size == 1 or not (isinstance(err, PeerLost) or is_collective_failure(err)):
            raise
        if isinstance(err, PeerLost) and epilogue is None:
            raise  # already the sentence (say, from a watched block inside this one)
        lost = err if isinstance(err, PeerLost) else peer_lost(world, err)
        if epilogue is not None:
            lost = PeerLost(f"{lost}; {epilogue()}")
        raise lost from err


def wait_for_main(world: World, what: str) -> None:
    """Every rank calls it once rank 0 has done `what` alone (a download, a checkpoint): the others
    wait for rank 0 up to `LONG_WAIT`, in the long-wait group; rank 0, which comes last, waits at
    most the collective timeout for them. Raises PeerLost naming a rank that did not come."""
    if world.size == 1:
        return
    missing = _check_in(world, world.side.long_wait, world.timeout)
    if missing == [0]:
        raise PeerLost(f"rank 0 stopped answering before it finished {what} (it exited, its own message says why, "
                       f"or ran past {_seconds(LONG_WAIT)})")
    if missing:
        raise PeerLost(f"{_ranks(missing)} stopped answering: rank 0 finished {what} and waited "
                       f"--collective_timeout={_seconds(world.timeout)} for it")


def wait_for_all(world: World, what: str) -> None:
    """The ranks that finished their share of `what` wait for the others (say, the one with the
    last batch), up to `LONG_WAIT`, in the long-wait group. Raises PeerLost naming a rank that
    did not come."""
    if world.size == 1:
        return
    missing = _check_in(world, world.side.long_wait, LONG_WAIT)
    if missing:
        raise PeerLost(f"{_ranks(missing)} stopped answering: {'it' if len(missing) == 1 else 'they'} did not finish "
                       f"{what} within {_seconds(LONG_WAIT)}")


@contextlib.contextmanager
def main_first(world: World, what: str):
    """Rank 0 runs the block first (downloads, caches) while the others wait for it (see
    `wait_for_main`); the others then run it and find its files."""
    if not world.is_main:
        wait_for_main(world, what)
    yield
    if world.is_main:
        wait_for_main(world, what)


def gather_to_main(obj, world: World) -> list | None:
    """Every rank's `obj`, as a list on rank 0 (None on the others)."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def gather_everywhere(obj, world: World) -> list:
    """Every rank's `obj` (picklable), as a list in rank order, on every rank."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj, world: World):
    """Rank 0's `obj` (picklable), on every rank."""
    if world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(x: Tensor, world: World) -> Tensor:
    """The element-wise mean of `x` over ranks (a copy; `x` itself when alone). Every rank must
    call it at the same point."""
    if world.size == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.AVG)
    return x


def own_rows(x: Tensor, global_batch: int, world: World) -> Tensor:
    """This rank's block of a global tensor whose rows are ``k`` stacked chunks of the global batch.

    ``x`` is ``[k G, ...]`` with ``G = global_batch`` (``k >= 1`` chunks, e.g. a regularizer's
    ``u_t`` rows then its ``s_t`` rows); rank ``r`` of ``W`` keeps rows ``[r G / W, (r + 1) G / W)``
    of every chunk, in chunk order. A row-wise loss on a rank's ``k G / W`` rows thus sees all the
    rows of each of its samples. A view (no copy) when alone.
    """
    if world.size == 1:
        return x
    return x.unflatten(0, (-1, world.size, global_batch // world.size))[:, world.rank].flatten(0, 1)


def resolve_device(flag: str | None) -> torch.device:
    """`--device` ("", "auto", "cpu", "cuda", "cuda:1", ...) -> a device; empty/auto = cuda if available."""
    if not flag or flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(flag)
    except RuntimeError:  # torch's message lists every backend it knows, few of which train here
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device={flag} is not a device this code runs on: pass cpu, cuda, cuda:N, mps or auto.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={flag} but no CUDA device is visible: pass --device=cpu or run on a GPU.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device={flag} but only {torch.cuda.device_count()} CUDA devices are visible: "
                        f"pick cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device={flag} but no Apple GPU is available: pass --device=cpu.")
    return device
