"""Pre-emption and the loop's own stop reasons: a flag every rank agrees on after each step."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from cfm.io.distributed import World, peers_watched

# A stop code above every signal number: rank 0 lost the run's lock (run_lock.LockLost).
LOCK_LOST = 1000


class StopRequest:
    """Pre-emption: SIGTERM, SIGUSR1 and SIGINT set a flag; the loop asks `agreed()` after each step.

    Schedulers send SIGTERM (SLURM, Kubernetes) or a chosen signal such as SIGUSR1 some time before
    they kill a job, and torchrun forwards INT/TERM to its workers. Acting between steps, never
    inside one, lets the loop write a consistent checkpoint. Under torchrun every rank must stop
    after the same step (a checkpoint needs every rank's state, and DDP's collectives would hang),
    but the signal may reach the ranks at different moments: `agreed()` takes the maximum of the
    ranks' flags with an all-reduce of one CPU integer on the gloo signals group, so the GPU stream
    is never synchronised for it. Work that may be cut short (sample grids, FID) polls this
    process's own flag, `requested()`. A second SIGINT (an impatient Ctrl-C) exits at once,
    writing nothing.
    """

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, name))

    def __init__(self, world: World):
        self.world = world
        self.signum = 0
        self._previous = {}
        self._flag = torch.zeros(1, dtype=torch.int32)

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

    def requested(self) -> bool:
        """Whether this process received a stop signal (no communication: any rank may ask any time)."""
        return self.signum != 0

    def agreed(self) -> int:
        """The signal every rank acts on after this step: 0 to go on, else the largest signal number
        any rank received. Raises PeerLost when another rank stopped answering. Every rank calls it
        every step."""
        if self.world.size == 1:
            return self.signum
        self._flag.fill_(self.signum)
        with peers_watched(self.world):
            dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.world.side.signals)
        return int(self._flag.item())  # a CPU tensor: no device sync
