"""The fast path: bf16 stays near fp32, the training forward compiles whole, compiled checkpoints
stay prefix-free, pipelined OT (the next plan solved on a worker thread) trains what inline OT
trains, bit for bit, and a training step reads no tensor on the host but at seven allowlisted calls
(a guard that fails the step otherwise, itself tested on thirteen kinds of read and on a second read
in an allowlisted function)."""

import dataclasses
import linecache
import re
import sys
import threading
import types
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_UNET_CONFIG, TINY_UNET_SETTINGS
from torch.utils._python_dispatch import TorchDispatchMode

from cfm.io import cifar10
from cfm.io.distributed import World
from cfm.method import nets
from cfm.method.flow_matching import make_matcher
from cfm.method.regularizers import AnchorRegularizer, LocalRegularizer
from cfm.method.samplers import ClassConditionedSampler
from cfm.method.unet import UNetModel
from cfm.config import ExecutionConfig, OptimConfig
from cfm.training import ot_pipeline
from cfm.training.fast_path import FastForward, resolve_precision
from cfm.training.trainer import build_trainer

REPO = Path(__file__).resolve().parents[1]
CPU = World(rank=0, size=1, device=torch.device("cpu"))


def build(model="otcfm", regularizer=None, monitor=False, dropout=0.0, **execution):
    """A Trainer of the tiny UNet as `build_trainer` makes it from these settings (`execution`:
    ExecutionConfig fields), on 64 random images (batch 4, dropout off, no warm-up); the
    zero-initialised layers get random weights, so the output is not zero from the first step. Same
    seed, same initial weights. `regularizer`: None, "anchor" (on single-cluster batches) or
    "local"; `monitor`: the local loss, monitored."""
    optim = OptimConfig(batch_size=4, warmup=0)
    unet_config = nets.unet_arguments(dataclasses.replace(TINY_UNET_SETTINGS, dropout=dropout))
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batches = cifar10.ShuffledBatches(images, optim.batch_size, optim.seed)
    reg = LocalRegularizer(1.0) if regularizer == "local" else None
    if regularizer == "anchor":
        batches = ClassConditionedSampler(images, torch.arange(64) % 10, optim.batch_size, num_subclasses=1)
        reg = AnchorRegularizer(1.0, 0.0, "full", images, batches.assignment, batches.num_clusters)
    monitored = (cifar10.ShuffledBatches(images, optim.batch_size, 1), LocalRegularizer(1.0)) if monitor else None
    torch.manual_seed(0)
    trainer = build_trainer(optim, ExecutionConfig(**execution), unet_config, CPU, make_matcher(model, 0.0),
                            batches, reg, monitored)
    with torch.no_grad():
        for p in trainer.params:
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape))  # drawn in logical order, whatever the memory format
    return trainer


def test_precision_auto_is_fp32_on_the_cpu():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_bf16_steps_stay_near_fp32_with_fp32_weights_adam_and_ema(one_thread):
    """Three steps from the same weights and draws: each bf16 loss within 1% of the fp32 one (bf16
    rounds each activation to 2^-9 relative; measured: 1e-4); weights, gradients, Adam and EMA stay fp32."""
    losses = {}
    for precision in ("fp32", "bf16"):
        trainer = build(precision=precision)
        assert trainer.precision == precision
        losses[precision] = torch.stack([trainer.step(step)["loss"] for step in range(3)])
    assert losses["bf16"].dtype == torch.float32
    torch.testing.assert_close(losses["bf16"], losses["fp32"], rtol=0.01, atol=0)
    assert not torch.equal(losses["bf16"], losses["fp32"])  # bf16 did run in bf16
    adam = trainer.optimizer.state[trainer.params[0]]
    assert {p.dtype for p in trainer.params + trainer.ema_params} == {torch.float32}
    assert {p.grad.dtype for p in trainer.params} == {torch.float32}
    assert adam["exp_avg"].dtype == adam["exp_avg_sq"].dtype == torch.float32


def test_the_training_forward_compiles_without_graph_breaks(one_thread):
    """Dynamo traces the UNet's training forward (train mode, bf16 autocast, channels-last) as one graph."""
    net = UNetModel(**TINY_UNET_CONFIG).to(memory_format=torch.channels_last)
    t, x = torch.rand(4), torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(net)(t, x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compile_wraps_only_the_training_forward_and_checkpoints_stay_prefix_free():
    trainer = build(compile=True, compile_mode="max-autotune-no-cudagraphs", model="icfm")
    assert isinstance(trainer.forward.module, torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.monitor_forward.module is trainer.net  # eager: grids, FID and the monitor too
    assert not any("_orig_mod" in key for key in trainer.net.state_dict())


def test_channels_last_trains_what_contiguous_trains(one_thread):
    """The same first step (loss and gradient norm, to float rounding) from the same weights and draws."""
    metrics = {}
    for channels_last in (False, True):
        trainer = build(channels_last=channels_last, model="icfm")
        metrics[channels_last] = torch.stack([trainer.step(0, with_metrics=True)[k] for k in ("loss", "grad_norm")])
    assert trainer.net.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(metrics[True], metrics[False], rtol=1e-5, atol=0)
    plain = UNetModel(**TINY_UNET_CONFIG)
    nets.load_weights(plain, trainer.net.state_dict())  # a channels-last checkpoint loads anywhere


def test_fast_forward_returns_the_inputs_dtype(one_thread):
    net = UNetModel(**TINY_UNET_CONFIG)
    t, x = torch.rand(2), torch.randn(2, 3, 32, 32)
    v = FastForward(net, torch.device("cpu"), "bf16", channels_last=True)(t, x)
    assert v.dtype == torch.float32 and v.shape == x.shape
    with pytest.raises(ValueError, match="fp32 or bf16"):
        FastForward(net, torch.device("cpu"), "auto")


def run_steps(trainer, steps, pipelined):
    """`steps` steps as the training loop runs them (prefetching after each one when pipelined)."""
    for step in range(steps):
        trainer.step(step)
        if pipelined:
            trainer.prefetch()


def test_pipelined_ot_trains_what_inline_ot_trains_bit_for_bit(one_thread):
    """otcfm (replacement pairing) with the anchor regularizer and dropout: the same weights, EMA,
    and the same next batch, noise and plan."""
    trainers = {}
    for pipelined in (True, False):
        trainer = trainers[pipelined] = build(ot_pipeline=pipelined, dropout=0.1, regularizer="anchor")
        assert (trainer.pipeline.worker is not None) == pipelined
        torch.manual_seed(1)  # dropout masks
        run_steps(trainer, 3, pipelined)
    pipelined, inline = trainers[True], trainers[False]
    for a, b in zip(pipelined.params + pipelined.ema_params, inline.params + inline.ema_params):
        assert torch.equal(a, b)
    ahead, drawn = pipelined.pipeline.ahead, inline.pipeline.fetch()  # the fourth step's draw: ahead, and inline
    assert torch.equal(ahead.x1, drawn.x1) and torch.equal(ahead.x0, drawn.x0)
    assert all(np.array_equal(a, b) for a, b in zip(ahead.plans.result(), drawn.plans))
    with pytest.raises(RuntimeError, match="save before prefetching"):  # a checkpoint now would skip a batch
        pipelined.streams_state()


def test_the_ot_worker_solves_the_next_plan_before_the_next_step_draws(one_thread):
    """The order of a pipelined run: the first plan is solved inline; from then on, when step k
    starts drawing, its plan was already handed to the worker thread (right after step k - 1)."""
    trainer = build(ot_pipeline=True)
    solved_on, requested = [], []
    solve, draw, ahead = trainer.matcher.solve, trainer.draw, lambda: trainer.pipeline.ahead

    def recording_solve(costs):
        solved_on.append(threading.current_thread().name)
        return solve(costs)

    def recording_draw(step):
        requested.append(ahead() is not None and isinstance(ahead().plans, Future))
        return draw(step)

    trainer.matcher.solve, trainer.draw = recording_solve, recording_draw
    run_steps(trainer, 3, pipelined=True)
    ahead().plans.result()
    assert requested == [False, True, True]
    assert solved_on[0] == threading.current_thread().name
    assert len(solved_on) == 4 and all(name.startswith("ot") for name in solved_on[1:])


# --------------------------------------------------------------------------------------------
# No host reads in a step
# --------------------------------------------------------------------------------------------


class HostRead(AssertionError):
    """A training step read a tensor's value on the host, or copied a tensor there."""


# The host reads a training step makes on purpose, each by its exact call: (file, function, kind of
# read, the source of the call, whitespace collapsed), so line shifts keep an entry and any other
# read in the same function fails. An entry is one place in the source: a copy of an allowed call
# elsewhere fails too. Every entry must be seen by the step test below, so none outlives the read
# it excuses.
ALLOWED_HOST_READS = {
    # torch's (non-fused) Adam keeps its step count in a CPU tensor, on a GPU as well, so reading
    # it for the bias corrections is no device sync; CUDA runs use fused Adam, which never reads it.
    ("torch/optim/optimizer.py", "_get_value", "scalar", "x.item()"),
    # The cluster sampler draws each batch's cluster on its own CPU generator, from CPU tensors.
    ("cfm/method/samplers.py", "_draw_cluster", "scalar",
     "int(self._nonempty[torch.multinomial(self._weights, 1, generator=self.generator)])"),
    # Exact OT runs on the CPU: the pipeline copies the cost matrix to the host on purpose (on a
    # GPU from a side stream into pinned memory, without blocking, ahead of the step) ...
    ("cfm/training/ot_pipeline.py", "fetch", "copy to the host",
     'costs.to("cpu", torch.float64, non_blocking=side is not None)'),
    # ... and POT reads that host copy as a numpy array (on the worker thread when pipelined).
    ("cfm/training/ot_pipeline.py", "solve", "numpy", "costs.numpy()"),
    # A centroid refresh (the first step, then every --centroid_update_freq) counts the members of
    # each cluster in the assignment, which lives on the CPU, and splits them by those counts.
    ("cfm/method/regularizers.py", "compute_centroids", "value-dependent shape",
     "torch.bincount(self.assignment, minlength=self.num_clusters)"),
    ("cfm/method/regularizers.py", "compute_centroids", "list", "counts.tolist()"),
    ("cfm/method/regularizers.py", "compute_centroids", "list", "counts_used.tolist()"),
}

aten = torch.ops.aten
# Ops that hand a value to the host (item() and float() end in _local_scalar_dense), and ops whose
# output shape depends on the values: on a GPU each waits for the device.
VALUE_RESULTS = {aten._local_scalar_dense, aten.equal, aten.allclose, aten.is_nonzero}
# (repeat_interleave: with a tensor of repeats and no output_size; int repeats never reach it.)
VALUE_SHAPED = {aten.nonzero, aten.masked_select, aten._unique2, aten.unique_dim, aten.unique_consecutive,
                aten.bincount, aten.repeat_interleave}
# Frames between a read and its call site: this guard, torch's Tensor wrappers (__format__,
# __array__, ...) and the plumbing that calls a dispatch mode.
TORCH_DIR = Path(torch.__file__).parent
PLUMBING = {str(TORCH_DIR / name) for name in ("_tensor.py", "_ops.py", "utils/_python_dispatch.py", "_compile.py",
                                               "_dynamo/eval_frame.py")}
GUARD_FRAMES = ("guarded", "__torch_dispatch__", "check")
# Tensor methods that hand a value to Python or numpy, or copy to the host -> kind of read.
READING_METHODS = {"item": "scalar", "__bool__": "scalar", "__float__": "scalar", "__int__": "scalar",
                   "__index__": "scalar", "__complex__": "scalar", "tolist": "list", "numpy": "numpy",
                   "cpu": "copy to the host", "to": "copy to the host"}


def call_site(frame) -> tuple[str, str, tuple[int, int], str]:
    """(file, function, (line, column), call) of the innermost frame outside the guard and torch's
    plumbing; files of this repo relative to it, torch's relative to torch's parent folder; `call`
    the source of the call that frame is making (see `source_of_call`)."""
    while frame.f_code.co_filename in PLUMBING or (
            frame.f_code.co_filename == __file__ and frame.f_code.co_name in GUARD_FRAMES):
        frame = frame.f_back
    path = Path(frame.f_code.co_filename)
    for root in (TORCH_DIR.parent, REPO):  # torch first: a .venv may live inside the repo
        if path.is_relative_to(root):
            path = path.relative_to(root)
            break
    call, place = source_of_call(frame)
    return path.as_posix(), frame.f_code.co_name, place, call


def source_of_call(frame) -> tuple[str, tuple[int, int]]:
    """(source, (line, column)) of the instruction `frame` is executing, a call: the whole call
    expression (`x.item()`, `int(...)`, `torch.bincount(...)`), from the positions Python stores per
    instruction, whitespace collapsed; the whole line where Python stores no columns."""
    line, end_line, column, end_column = list(frame.f_code.co_positions())[frame.f_lasti // 2]
    if line is None:
        line = end_line = frame.f_lineno
    text = [linecache.getline(frame.f_code.co_filename, n).encode() for n in range(line, end_line + 1)]
    if column is not None and end_column is not None:  # offsets in UTF-8 bytes
        text[-1] = text[-1][:end_column]
        text[0] = text[0][column:]
    return " ".join(b"".join(text).decode().split()), (line, column)


def names_the_host(*args, **kwargs) -> bool:
    """Whether Tensor.to(*args, **kwargs) names the host as "cpu". A torch.device is not enough: on
    this CPU run the training device is the CPU too (`x.to(y.device)` moves onto the device)."""
    device = kwargs.get("device", args[0] if args else None)
    return isinstance(device, str) and torch.device(device).type == "cpu"


class HostReadGuard(TorchDispatchMode):
    """While installed: a host read of any tensor outside `ALLOWED_HOST_READS` raises HostRead (and
    is recorded in `refused`, in case another thread swallowed it), as does an allowed call made at
    a second place; the allowed ones seen are the keys of `allowed`, each with its (line, column).

    Host reads are what would wait for a GPU: a value handed to Python (`.item()`, `.tolist()`,
    `bool()`, `float()`, `int()`, `complex()`, `__index__`, f-strings and printing), to numpy
    (`.numpy()`, `np.asarray`), a copy to the host (`.cpu()`, `.to("cpu")`), and the ops whose output
    shape depends on the values (`nonzero`, boolean-mask indexing, `masked_select`, `unique`,
    `bincount`, `repeat_interleave` by a tensor of repeats, `equal`). The Tensor methods are patched
    for every thread (the OT worker's too); the dispatch mode, on this thread, also sees the reads
    torch makes inside its own ops (`allclose`, ...).

    Every tensor is checked, not only those derived from the net, the batch or the noise: on the
    CPU all of them live on the host, so the bookkeeping that is host-side on a GPU too (the
    allowlist) is told apart by call site instead.
    """

    def __init__(self):
        super().__init__()
        self.allowed, self.refused = {}, []

    def check(self, kind: str, frame) -> None:
        file, function, place, call = call_site(frame)
        key = (file, function, kind, call)
        if key in ALLOWED_HOST_READS and self.allowed.setdefault(key, place) == place:
            return
        self.refused.append(f"{kind} at {file}:{place[0]} ({function}): {call}")
        raise HostRead(f"a training step read a tensor on the host: {self.refused[-1]}")

    def install(self, monkeypatch) -> "HostReadGuard":
        """Patch the Tensor methods that read (undone by `monkeypatch`); the dispatch mode is on
        while the guard is entered as a context."""
        for name, kind in READING_METHODS.items():
            monkeypatch.setattr(torch.Tensor, name, self.checking(getattr(torch.Tensor, name), kind, name == "to"))
        return self

    def checking(self, method, kind: str, only_to_the_host: bool):
        """`method`, checked before it runs (`to` only when it names the host)."""

        def guarded(tensor, *args, **kwargs):
            if not only_to_the_host or names_the_host(*args, **kwargs):
                self.check(kind, sys._getframe(1))
            return method(tensor, *args, **kwargs)

        return guarded

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in VALUE_RESULTS:
            self.check("scalar", sys._getframe(1))
        elif (func.overloadpacket in VALUE_SHAPED and kwargs.get("output_size") is None) or (
                func.overloadpacket in (aten.index, aten.index_put, aten.index_put_)
                and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])):
            self.check("value-dependent shape", sys._getframe(1))
        return func(*args, **kwargs)


def run_guarded(trainer, monkeypatch, steps=3):
    """`steps` steps as the loop runs them (a prefetch after each but the last; the last a log step)
    under a HostReadGuard; returns (guard, the last step's metrics)."""
    guard = HostReadGuard().install(monkeypatch)
    with guard:
        for step in range(steps):
            metrics = trainer.step(step, with_metrics=step == steps - 1)
            if step < steps - 1:
                trainer.prefetch()
        if trainer.pipeline.ahead is not None:  # a read on the worker thread surfaces here
            trainer.pipeline.ahead.plans.result()
    monkeypatch.undo()
    return guard, metrics


@pytest.mark.parametrize("case", ["otcfm_anchor_clusters", "icfm_local_monitor"])
def test_a_step_reads_nothing_on_the_host_but_the_allowlisted_reads(case, monkeypatch, one_thread):
    """Steps from the first one (first centroids, first OT plan inline, then pipelined) reading
    no tensor on the host but at the allowlisted call sites, each of which is seen (otcfm + anchor
    on clustered batches: all of them; icfm + local on shuffled batches, with the local monitor:
    Adam's). Metrics come back as tensors, `lr` as the host's own float."""
    if case == "otcfm_anchor_clusters":
        trainer, expected = build(regularizer="anchor"), ALLOWED_HOST_READS
    else:
        trainer = build(model="icfm", regularizer="local", monitor=True)
        expected = {key for key in ALLOWED_HOST_READS if key[1] == "_get_value"}
    guard, metrics = run_guarded(trainer, monkeypatch)
    assert guard.refused == [] and set(guard.allowed) == expected
    assert isinstance(metrics.pop("lr"), float)
    assert metrics and all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in metrics.values())


READS = {  # a host read of the loss, as a stray debugging line would make it
    "item": lambda loss: loss.item(),
    "float": lambda loss: float(loss),
    "bool": lambda loss: bool(loss > 1),
    "format": lambda loss: f"{loss:.3f}",
    "tolist": lambda loss: loss.tolist(),
    "numpy": lambda loss: loss.detach().numpy(),
    "cpu": lambda loss: loss.detach().cpu(),
    "to_cpu": lambda loss: loss.to("cpu", torch.float64),
    "index": lambda loss: [0, 1][(loss > 1).long()],
    "nonzero": lambda loss: loss.reshape(1).nonzero(),
    "allclose": lambda loss: torch.allclose(loss, loss),
    "bincount": lambda loss: torch.bincount((loss > 1).long().reshape(1)),
    "repeat_interleave": lambda loss: torch.ones(1).repeat_interleave((loss > 1).long().reshape(1)),
}


@pytest.mark.parametrize("read", list(READS))
def test_the_guard_fails_a_step_that_reads_the_loss(read, monkeypatch, one_thread):
    """Testing the test: one read of the loss inside `Trainer.losses` fails the step, naming its line."""
    trainer = build(model="icfm")
    losses = trainer.losses

    def losses_then_read(inputs):
        terms, loss, vt = losses(inputs)
        READS[read](loss)
        return terms, loss, vt

    trainer.losses = losses_then_read
    with pytest.raises(HostRead, match=r"at tests/test_fast_path.py:\d+ \(<lambda>\)"):
        run_guarded(trainer, monkeypatch, steps=1)


SECOND_READS = {  # a line of OTPipeline.fetch, and the read appended to it
    "another_call": ("x1, cluster = self.batches.next_batch()", "x1.cpu()"),
    "the_allowed_call_again": ('costs = costs.to("cpu", torch.float64, non_blocking=side is not None)',
                               'costs.to("cpu", torch.float64, non_blocking=side is not None)'),
}


@pytest.mark.parametrize("case", list(SECOND_READS))
def test_the_guard_fails_a_second_read_in_an_allowlisted_function(case, monkeypatch, one_thread):
    """Testing the test: OTPipeline.fetch, whose cost copy is allowlisted, with one more host read
    on one of its lines (another call, or the allowed call made a second time) fails the step,
    naming that call. The patched ot_pipeline.py is compiled under its own file name, and the guard
    reads its source from linecache, where the patched text stands in for the file's."""
    line, read = SECOND_READS[case]
    path = ot_pipeline.__file__
    source = Path(path).read_text()
    assert source.count(line) == 1
    patched = source.replace(line, f"{line}; {read}")
    namespace = {}
    exec(compile(patched, path, "exec"), namespace)
    monkeypatch.setitem(linecache.cache, path, (len(patched), None, patched.splitlines(keepends=True), path))
    trainer = build()
    trainer.pipeline.fetch = types.MethodType(namespace["OTPipeline"].fetch, trainer.pipeline)
    number = source[:source.index(line)].count("\n") + 1
    with pytest.raises(HostRead, match=f"copy to the host at cfm/training/ot_pipeline.py:{number} \\(fetch\\): "
                                       f"{re.escape(read)}$"):
        run_guarded(trainer, monkeypatch, steps=1)
