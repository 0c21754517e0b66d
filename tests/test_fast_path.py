"""The fast path: bf16 stays near fp32, the training forward compiles whole, the step hands back
device tensors without branching on them, compiled checkpoints stay prefix-free, and pipelined OT
(the next plan solved on a worker thread) trains what inline OT trains, bit for bit."""

import threading
from concurrent.futures import Future

import numpy as np
import pytest
import torch
from absl import flags

import train_cifar10  # noqa: F401  (defines the training flags)
import training
import utils_cifar
from conftest import TINY_UNET_CONFIG, TINY_UNET_FLAGS
from distributed import World
from fast_path import FastForward, resolve_precision
from flow_matching import make_matcher
from regularizers import AnchorRegularizer
from samplers import ClassConditionedSampler
from unet import UNetModel

FLAGS = flags.FLAGS
CPU = World(rank=0, size=1, device=torch.device("cpu"))


def build(*args, model="otcfm", regularizer=None):
    """A Trainer of the tiny UNet as `build_trainer` makes it from these flags, on 64 random images
    (batch 4, dropout off, no warm-up); the zero-initialised layers get random weights, so the
    output is not zero from the first step. Same seed, same initial weights."""
    FLAGS.unparse_flags()
    FLAGS(["train_cifar10.py", *TINY_UNET_FLAGS, "--batch_size=4", "--dropout=0", "--warmup=0", "--device=cpu",
           f"--model={model}", *args])
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batches = utils_cifar.ShuffledBatches(images, FLAGS.batch_size, FLAGS.seed)
    reg = None
    if regularizer == "anchor":
        batches = ClassConditionedSampler(images, torch.arange(64) % 10, FLAGS.batch_size, num_subclasses=1)
        reg = AnchorRegularizer(1.0, 0.0, "full", images, batches.assignment, batches.num_clusters)
    torch.manual_seed(0)
    trainer = training.build_trainer(FLAGS, training.unet_config_from_flags(FLAGS), CPU,
                                     make_matcher(model, 0.0, FLAGS.ot_pairing), batches, reg)
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
        trainer = build(f"--precision={precision}")
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
    trainer = build("--compile", "--compile_mode=max-autotune-no-cudagraphs", model="icfm")
    assert isinstance(trainer.forward.module, torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.monitor_forward.module is trainer.net  # eager: grids, FID and the monitor too
    assert not any("_orig_mod" in key for key in trainer.net.state_dict())


def test_channels_last_trains_what_contiguous_trains(one_thread):
    """The same first step (loss and gradient norm, to float rounding) from the same weights and draws."""
    metrics = {}
    for layout in ("--nochannels_last", "--channels_last"):
        trainer = build(layout, model="icfm")
        metrics[layout] = torch.stack([trainer.step(0, with_metrics=True)[k] for k in ("loss", "grad_norm")])
    assert trainer.net.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(metrics["--channels_last"], metrics["--nochannels_last"], rtol=1e-5, atol=0)
    plain = UNetModel(**TINY_UNET_CONFIG)
    utils_cifar.load_weights(plain, trainer.net.state_dict())  # a channels-last checkpoint loads anywhere


def test_the_step_returns_device_tensors_and_never_branches_on_them(monkeypatch, one_thread):
    """No Python branching on a device value inside a step (it would wait for the GPU): every
    `bool(tensor)` raises here. Metrics come back as tensors, `lr` as the host's own float."""
    trainer = build(regularizer="anchor")
    trainer.step(0)  # the first centroids are computed before any training (host reads allowed there)

    def refuse(self):
        raise AssertionError("the step branched on a tensor's value")

    monkeypatch.setattr(torch.Tensor, "__bool__", refuse)
    trainer.step(1)
    metrics = trainer.step(2, with_metrics=True)
    monkeypatch.undo()
    assert isinstance(metrics.pop("lr"), float)
    assert metrics and all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in metrics.values())


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
        trainer = trainers[pipelined] = build(f"--ot_pipeline={pipelined}", "--dropout=0.1", regularizer="anchor")
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
    trainer = build("--ot_pipeline=True")
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
