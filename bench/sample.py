"""Sampling throughput of each ODE solver: images/s, NFE, ms per field evaluation, and FLOP/s.

    python bench/sample.py --num_channel=32 --batch_size=16 --integration_steps=4 --device=cpu   # CPU check
    python bench/sample.py --device=cuda --batch_size=1024                                       # paper UNet
    python bench/sample.py --device=cuda --checkpoint=results/otcfm/otcfm_cifar10_weights_step_400000.pt

Times one batch of `batch_size` samples per solver through `sampling.sample_batches` (what
compute_fid.py runs), after two untimed warm-up forwards. Without --checkpoint the paper UNet (with
--num_channel) gets random weights; its output layer is randomised too (it starts at zero, which
would make dopri5 finish in a handful of steps), but dopri5's NFE on a random net still says little
about a trained one (published: about 134 for OT-CFM, 146 for I-CFM): pass a checkpoint for that.
FLOPs per forward are counted once with torch's FlopCounterMode (2 per multiply-add; the paper UNet
is 12.44 GFLOP per 32x32 image); achieved TFLOP/s = FLOPs per forward x batch x NFE / seconds.
"""

import os
import sys
import time

import torch
from absl import app, flags
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cfm.evaluation.sampling import sample_batches  # noqa: E402
from cfm.evaluation.solvers import SOLVERS  # noqa: E402
from cfm.io import checkpoint_io, distributed, run_files  # noqa: E402
from cfm.method import nets  # noqa: E402
from cfm.method.unet import PAPER_CONFIG, UNetModel  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_channel", 128, "Base width of the paper UNet (ignored with --checkpoint).", lower_bound=1)
flags.DEFINE_integer("batch_size", 256, "Samples per solve (one ODE system).", lower_bound=1)
flags.DEFINE_string("device", "auto", "auto (cuda if available), cpu, cuda, ...")
flags.DEFINE_integer("integration_steps", 100, "Steps of the fixed-step solvers.", lower_bound=1)
flags.DEFINE_float("tol", 1e-5, "atol = rtol of dopri5.", lower_bound=1e-12)
flags.DEFINE_list("methods", list(SOLVERS), "Solvers to time.")
flags.DEFINE_string("checkpoint", None, "Time a trained net (EMA weights) instead of a random one.")
flags.DEFINE_integer("seed", 0, "Weights (random net) and noise seed.")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_net(device: torch.device) -> torch.nn.Module:
    if FLAGS.checkpoint:
        return nets.build_net_from_checkpoint(checkpoint_io.load_checkpoint(FLAGS.checkpoint), device=device)
    torch.manual_seed(FLAGS.seed)
    net = UNetModel(**dict(PAPER_CONFIG, num_channels=FLAGS.num_channel))
    torch.nn.init.normal_(net.out[-1].weight, std=0.02)
    return net.to(device).eval().requires_grad_(False)


def flops_per_image(net: torch.nn.Module, device: torch.device) -> float:
    """FLOPs of one forward of one image (counted on a batch of 2, halved)."""
    x = torch.zeros(2, *net.config["dim"], device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(2, device=device), x)
    return counter.get_total_flops() / 2


def main(argv):
    del argv
    for method in FLAGS.methods:
        if method not in SOLVERS:
            raise app.UsageError(f"unknown solver {method!r}: choose among {', '.join(SOLVERS)}.")
    device = distributed.resolve_device(FLAGS.device)
    net = build_net(device)
    flops = flops_per_image(net, device)
    params = sum(p.numel() for p in net.parameters())
    print(f"UNet {params / 1e6:.2f} M parameters, {flops / 1e9:.2f} GFLOP per image forward; batch "
          f"{FLAGS.batch_size} on {run_files.provenance(device)['device']} ({device}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

    def solve(method: str) -> int:
        (_, nfe), = sample_batches(net, FLAGS.batch_size, FLAGS.batch_size, method, FLAGS.integration_steps,
                                   FLAGS.tol, FLAGS.seed)
        return nfe

    # Warm-up at the timed batch size (kernel selection, allocator, oneDNN primitives).
    with torch.no_grad():
        for _ in range(2):
            net(torch.tensor(0.5, device=device), torch.zeros(FLAGS.batch_size, *net.config["dim"], device=device))
    print(f"{'solver':<9} {'setting':<12} {'NFE':>5} {'seconds':>9} {'images/s':>10} {'ms/NFE':>8} {'TFLOP/s':>8}")
    for method in FLAGS.methods:
        setting = f"tol={FLAGS.tol:g}" if method == "dopri5" else f"steps={FLAGS.integration_steps}"
        sync(device)
        start = time.perf_counter()
        nfe = solve(method)
        sync(device)
        seconds = time.perf_counter() - start
        tflops = flops * FLAGS.batch_size * nfe / seconds / 1e12
        print(f"{method:<9} {setting:<12} {nfe:>5} {seconds:>9.3f} {FLAGS.batch_size / seconds:>10.1f} "
              f"{seconds / nfe * 1e3:>8.2f} {tflops:>8.3f}")


if __name__ == "__main__":
    app.run(main)
