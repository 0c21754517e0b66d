"""ODE solvers for dx/dt = v(t, x) from t = 0 to 1, with NFE counting, and the solver settings of FID sweeps
(with the guidance scales a sweep may list beside them, ``split_guidance_sweep``).

Solvers (``SOLVERS``):
    dopri5    adaptive Dormand-Prince 5(4) from torchdiffeq, atol = rtol = ``tol``, the whole batch
              integrated as ONE system (one step size for all samples), as the published numbers were.
    euler     x <- x + h v(t, x)                                            (order 1, 1 NFE / step)
    midpoint  x <- x + h v(t + h/2, x + h/2 v(t, x))                        (order 2, 2 NFE / step)
    heun      k1 = v(t, x), k2 = v(t + h, x + h k1), x <- x + h/2 (k1 + k2) (order 2, 2 NFE / step)
    rk4       the classical Runge-Kutta scheme (1/6, 1/3, 1/3, 1/6)       (order 4, 4 NFE / step)

The fixed-step schemes are written here rather than taken from torchdiffeq because (a) torchdiffeq
builds its grid from a step size with ``ceil((t1 - t0) / h + 1)`` points, which float rounding can
turn into one extra step (so ``steps`` and NFE would not be exact), (b) its ``rk4`` is the 3/8-rule
variant, not the classical scheme users expect, and (c) each scheme is three lines. The time grid is
``torch.linspace(0, 1, steps + 1)``, the grid of the published Euler runs (torchdyn's t_span).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cfm.config.choices import SOLVERS
from cfm.io.errors import UserError

Field = Callable[[Tensor, Tensor], Tensor]


def check_solver(method: str) -> None:
    """Raise ValueError naming the choices if `method` is not a known solver."""
    if method not in SOLVERS:
        raise ValueError(f"unknown ODE solver {method!r}: choose one of {', '.join(SOLVERS)}.")


class _CountingField:
    """Wraps v(t, x) and counts its calls: the NFE of each sample path, since the batch is one system."""

    def __init__(self, field: Field):
        self.field = field
        self.calls = 0

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        self.calls += 1
        return self.field(t, x)


def _euler_step(f: Field, t: Tensor, h: Tensor, x: Tensor) -> Tensor:
    return x + h * f(t, x)


def _midpoint_step(f: Field, t: Tensor, h: Tensor, x: Tensor) -> Tensor:
    k1 = f(t, x)
    return x + h * f(t + h / 2, x + (h / 2) * k1)


def _heun_step(f: Field, t: Tensor, h: Tensor, x: Tensor) -> Tensor:
    k1 = f(t, x)
    k2 = f(t + h, x + h * k1)
    return x + (h / 2) * (k1 + k2)


def _rk4_step(f: Field, t: Tensor, h: Tensor, x: Tensor) -> Tensor:
    k1 = f(t, x)
    k2 = f(t + h / 2, x + (h / 2) * k1)
    k3 = f(t + h / 2, x + (h / 2) * k2)
    k4 = f(t + h, x + h * k3)
    return x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


_FIXED_STEPS = {"euler": _euler_step, "midpoint": _midpoint_step, "heun": _heun_step, "rk4": _rk4_step}


def integrate(
    field: Field, x0: Tensor, method: str = "dopri5", steps: int = 100, tol: float = 1e-5
) -> tuple[Tensor, int]:
    """Solve dx/dt = field(t, x) from x(0) = x0 to t = 1.

    Args:
        field: v(t, x) -> dx/dt with the shape of x; t is a 0-dim tensor (one time for the batch).
        x0: [B, ...] initial state.
        method: one of ``SOLVERS``.
        steps: number of equal steps for the fixed-step solvers (ignored by dopri5).
        tol: atol = rtol for dopri5 (ignored by the fixed-step solvers).

    Returns:
        x1: [B, ...] the state at t = 1.
        nfe: number of field evaluations (per sample path: the batch is integrated as one system).
            euler: steps; midpoint, heun: 2 * steps; rk4: 4 * steps; dopri5: what the solver took.

    Runs in the caller's autograd mode: wrap in ``torch.no_grad()`` for sampling.
    """
    check_solver(method)
    counter = _CountingField(field)
    if method == "dopri5":
        # Imported here: only the adaptive solver needs torchdiffeq.
        from torchdiffeq import odeint

        t_span = torch.tensor([0.0, 1.0], dtype=x0.dtype, device=x0.device)
        x1 = odeint(counter, x0, t_span, method="dopri5", atol=tol, rtol=tol)[-1]
        return x1, counter.calls
    if steps < 1:
        raise ValueError(f"steps must be a positive number of solver steps, got {steps}.")
    step = _FIXED_STEPS[method]
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=x0.dtype, device=x0.device)
    x = x0
    for i in range(steps):
        x = step(counter, grid[i], grid[i + 1] - grid[i], x)
    return x, counter.calls


@dataclass(frozen=True)
class SolverSetting:
    """One solver configuration: `steps` is read by the fixed-step solvers, `tol` by dopri5.

    ``dataclasses.asdict(setting)`` gives the method / steps / tol arguments of the sampling functions.
    """

    method: str
    steps: int = 100
    tol: float = 1e-5

    def __str__(self) -> str:
        return f"dopri5 tol {self.tol:g}" if self.method == "dopri5" else f"{self.method} {self.steps} steps"

    def describe(self) -> dict:
        """The fields that identify this setting in a results record (fid.jsonl)."""
        value = {"tol": self.tol} if self.method == "dopri5" else {"integration_steps": self.steps}
        return {"integration_method": self.method, **value}


def parse_sweep(spec: str) -> list[SolverSetting]:
    """'euler:1,2,5;midpoint:5,10;dopri5:1e-3,1e-4' -> the settings, in the order written.

    A fixed-step solver lists step counts (positive integers), dopri5 tolerances (positive numbers).
    Raises UserError (one sentence) on anything else.
    """
    usage = (f"write SOLVER:V1,V2 entries joined by ';', SOLVER one of {', '.join(SOLVERS)}, with step counts for "
             "the fixed-step solvers and tolerances for dopri5, and optionally guidance:W1,W2 (for example "
             "euler:1,10,100;dopri5:1e-4;guidance:1,2)")
    settings = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        method, _, values = (x.strip() for x in part.partition(":"))
        try:
            numbers = [float(v) if method == "dopri5" else int(v) for v in values.split(",")]
        except ValueError:
            numbers = []
        if method not in SOLVERS or not numbers or not all(0 < v < math.inf for v in numbers):
            raise UserError(f"cannot read --sweep entry {part!r}: {usage}.")
        settings += [SolverSetting(method, tol=v) if method == "dopri5" else SolverSetting(method, steps=v) for v in numbers]
    if not settings:
        raise UserError(f"--sweep={spec!r} names no setting: {usage}.")
    return settings


GUIDANCE_ENTRY = "guidance"


def split_guidance_sweep(spec: str) -> tuple[str, list[float] | None]:
    """'euler:10,100;guidance:0,1,2' -> ('euler:10,100', [0.0, 1.0, 2.0]): the solver entries (for
    `parse_sweep`; '' when the sweep lists only scales) and the classifier-free guidance scales w of
    its ``guidance:W1,W2`` entry, in the order written (None without one). Any finite w is a scale
    (0: the unconditional field, 1: the conditional one). UserError (one sentence) for unreadable
    scales or a second guidance entry."""
    solvers, scales = [], None
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, values = (x.strip() for x in part.partition(":"))
        if name != GUIDANCE_ENTRY:
            solvers.append(part)
            continue
        if scales is not None:
            raise UserError(f"--sweep={spec!r} has two guidance entries: list every scale in one, guidance:W1,W2.")
        try:
            scales = [float(v) for v in values.split(",")]
        except ValueError:
            scales = []
        if not scales or not all(math.isfinite(w) for w in scales):
            raise UserError(f"cannot read --sweep entry {part!r}: write guidance:W1,W2 with finite guidance scales "
                            "(for example guidance:0,1,1.5,2).")
    return ";".join(solvers), scales
