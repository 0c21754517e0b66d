"""One distributed code path: a plain `python script.py` is a world of size 1, `torchrun` a world
of one process per GPU (or per CPU process, with gloo). Every rank computes; only rank 0 writes.

World-size invariance: every rank draws the whole global batch from streams shared by all ranks
(the same seed everywhere), so all ranks hold identical global tensors, and each rank trains on its
own contiguous block of rows (`own_rows`). DDP averages the blocks' gradients, which is the
gradient of the global mean loss: N processes train exactly what one process trains.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

import utils_cifar


@dataclass
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# Rank 0 alone draws grids, writes checkpoints and computes FID while the other ranks wait in the
# next collective: the default 10-minute watchdog would kill a run at its first FID.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


def process_rank() -> int:
    """This process's rank: the process group's if one is joined, else torchrun's $RANK, else 0.

    For code deep in a helper with no World at hand (a progress bar that only rank 0 draws).
    """
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def init_world(device_flag: str) -> World:
    """Join the torchrun process group if launched by torchrun; pick this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = utils_cifar.resolve_device(device_flag)
    if device.type == "cuda":
        if size > 1:  # one GPU per process, as torchrun lays them out
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return World(rank=rank, size=size, device=device)


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first(world: World):
    """Rank 0 runs the block first (downloads, caches); the other ranks then run it and find its files."""
    if not world.is_main:
        barrier(world)
    yield
    if world.is_main:
        barrier(world)


def gather_to_main(obj, world: World) -> list | None:
    """Every rank's `obj`, as a list on rank 0 (None on the others)."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
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


class PeerLost(utils_cifar.UserError):
    """Another rank stopped answering (it died): this rank exits without writing anything."""


# A stop code above every signal number: rank 0 lost the run's lock (run_lock.LockLost).
LOCK_LOST = 1000


class StopRequest:
    """Pre-emption: SIGTERM, SIGUSR1 and SIGINT set a flag; the loop asks `agreed()` after each step.

    Schedulers send SIGTERM (SLURM, Kubernetes) or a chosen signal such as SIGUSR1 some time before
    they kill a job, and torchrun forwards INT/TERM to its workers. Acting between steps, never
    inside one, lets the loop write a consistent checkpoint. Under torchrun every rank must stop
    after the same step (a checkpoint needs every rank's state, and DDP's collectives would hang),
    but the signal may reach the ranks at different moments: `agreed()` takes the maximum of the
    ranks' flags with an all-reduce of one CPU integer on a gloo side group, so the GPU stream is
    never synchronised for it. A second SIGINT (an impatient Ctrl-C) exits at once, writing nothing.
    """

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, name))

    def __init__(self, world: World):
        self.world = world
        self.signum = 0
        self._previous = {}
        self._flag = torch.zeros(1, dtype=torch.int32)
        # A gloo group on top of NCCL: the flag lives on the CPU, so its all-reduce needs no GPU sync.
        self._group = dist.new_group(backend="gloo") if world.size > 1 else None

    def __enter__(self) -> StopRequest:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise SystemExit(130)
        self.signum = max(self.signum, signum)

    def request(self, code: int) -> None:
        """Ask every rank to stop after this step for a reason of the loop's own (e.g. LOCK_LOST)."""
        self.signum = max(self.signum, code)

    def agreed(self) -> int:
        """The signal every rank acts on after this step: 0 to go on, else the largest signal number
        any rank received. Raises PeerLost when another rank has died. Every rank calls it every step."""
        if self.world.size == 1:
            return self.signum
        self._flag.fill_(self.signum)
        try:
            dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group)
        except Exception as err:  # gloo raises RuntimeError / DistBackendError when a peer is gone
            raise PeerLost(f"another training process stopped answering ({type(err).__name__}): "
                           f"this one exits without writing a checkpoint.") from err
        return int(self._flag.item())  # a CPU tensor: no device sync
