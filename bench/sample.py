"""Sampling throughput of each ODE solver: images/s, NFE, ms per field evaluation, and FLOP/s.

    python bench/sample.py --num_channel=32 --batch_size=16 --integration_steps=4 --device=cpu   # CPU check
    python bench/sample.py --device=cuda --batch_size=1024                                       # paper UNet
    python bench/sample.py --device=cuda --checkpoint=results/otcfm/otcfm_cifar10_weights_step_400000.pt
    python bench/sample.py --guided --num_channel=32 --batch_size=16 --methods=euler --integration_steps=4 \
        --repeats=7 --device=cpu                                                                  # guidance's cost

Times one batch of `batch_size` samples per solver through `sampling.sample_batches` (what
compute_fid.py runs), after two untimed warm-up forwards. Without --checkpoint the paper UNet (with
--num_channel) gets random weights; its output layer is randomised too (it starts at zero, which
would make dopri5 finish in a handful of steps), but dopri5's NFE on a random net still says little
about a trained one (published: about 134 for OT-CFM, 146 for I-CFM): pass a checkpoint for that.
FLOPs per forward are counted once with torch's FlopCounterMode (2 per multiply-add; the paper UNet
is 12.44 GFLOP per 32x32 image); achieved TFLOP/s = FLOPs per forward x batch x NFE / seconds.

--guided times a class-conditioned net (10 labels; the checkpoint's labels with --checkpoint) under
classifier-free guidance (`cfm.method.guidance`), each solver at w=1 (the conditional field: B rows
a call) and at w=--guidance_scale (one call of 2B rows, labels then null labels), and prints the
guided/unguided time per solver call, which is the time per sampling step (a fixed-step solver
makes as many calls at either scale; dopri5 may not), against the target of at most 2.05x: a
guided step does twice the network work, and may cost little more than that. NFE counts both rows
of a guided call, so per NFE the ratio is half that per call. With --repeats the solves of the two
scales alternate, so that a change of load on a shared machine hits both, and each row is the
median.
"""

import os
import statistics
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
from cfm.method.clustering import NUM_CLASSES  # noqa: E402
from cfm.method.guidance import Guidance, balanced_labels  # noqa: E402
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
flags.DEFINE_bool("guided", False, "Time a class-conditioned net at w=1 and at w=--guidance_scale (see above).")
flags.DEFINE_float("guidance_scale", 2.0, "w of the guided rows (--guided); not 0 or 1, which take B rows a call.")
flags.DEFINE_integer("repeats", 1, "Timed solves per row; the row shows the median.", lower_bound=1)
flags.DEFINE_string("out", "", "Also append the table to this file.")

GUIDED_TARGET = 2.05  # at most this many times an unguided step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_net(device: torch.device) -> torch.nn.Module:
    """The checkpoint's EMA net, or a random paper UNet (class-conditioned with --guided)."""
    if FLAGS.checkpoint:
        net = nets.build_net_from_checkpoint(checkpoint_io.load_checkpoint(FLAGS.checkpoint), device=device)
        if FLAGS.guided and net.num_classes is None:
            raise app.UsageError(f"--guided needs a label-conditioned net, and {FLAGS.checkpoint} is unconditional: "
                                 f"drop --checkpoint to time a random conditional one.")
        return net
    torch.manual_seed(FLAGS.seed)
    net = UNetModel(**dict(PAPER_CONFIG, num_channels=FLAGS.num_channel,
                           num_classes=NUM_CLASSES if FLAGS.guided else None))
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
    if FLAGS.guided and FLAGS.guidance_scale in (0.0, 1.0):
        raise app.UsageError(f"--guidance_scale={FLAGS.guidance_scale:g} makes one B-row call, as unguided sampling "
                             f"does: pick another w, e.g. 2.")
    device = distributed.resolve_device(FLAGS.device)
    net = build_net(device)
    flops = flops_per_image(net, device)
    params = sum(p.numel() for p in net.parameters())
    labels = balanced_labels(FLAGS.batch_size, net.num_classes) if FLAGS.guided else None
    # Unguided: the net alone (--guided: its conditional field, w=1); guided: w=--guidance_scale.
    scales = [1.0, FLAGS.guidance_scale] if FLAGS.guided else [None]
    guidances = {w: None if w is None else Guidance(labels, w) for w in scales}
    lines = [f"UNet {params / 1e6:.2f} M parameters, {flops / 1e9:.2f} GFLOP per image forward; batch "
             f"{FLAGS.batch_size} on {run_files.provenance(device)['device']} ({device}), torch {torch.__version__}, "
             f"{torch.get_num_threads()} CPU threads, median of {FLAGS.repeats}"
             + (f"; class-conditioned ({net.num_classes} labels), w=1 against w={FLAGS.guidance_scale:g}"
                if FLAGS.guided else "")]
    print(lines[0])

    def solve(method: str, guidance: Guidance | None) -> tuple[float, int]:
        sync(device)
        start = time.perf_counter()
        (_, nfe), = sample_batches(net, FLAGS.batch_size, FLAGS.batch_size, method, FLAGS.integration_steps,
                                   FLAGS.tol, FLAGS.seed, guidance=guidance)
        sync(device)
        return time.perf_counter() - start, nfe

    # Warm-up at every timed row count (kernel selection, allocator, oneDNN primitives).
    with torch.no_grad():
        for guidance in guidances.values():
            field = net if guidance is None else guidance.field(net, range(FLAGS.batch_size))
            for _ in range(2):
                field(torch.tensor(0.5, device=device), torch.zeros(FLAGS.batch_size, *net.config["dim"], device=device))
    lines.append(f"{'solver':<9} {'setting':<18} {'NFE':>5} {'seconds':>9} {'images/s':>10} {'ms/NFE':>8} "
                 f"{'TFLOP/s':>8}")
    print(lines[-1])
    for method in FLAGS.methods:
        runs = {w: [] for w in scales}
        for _ in range(FLAGS.repeats):
            for w in scales:
                runs[w].append(solve(method, guidances[w]))
        per_call = {}
        for w in scales:
            seconds = statistics.median(s for s, _ in runs[w])
            nfe = runs[w][0][1]  # the same each time: the same net, noise and solver
            setting = f"tol={FLAGS.tol:g}" if method == "dopri5" else f"steps={FLAGS.integration_steps}"
            if w is not None:
                setting += f" w={w:g}"
                per_call[w] = seconds / (nfe / guidances[w].field(net, [0]).evaluations_per_call)
            tflops = flops * FLAGS.batch_size * nfe / seconds / 1e12
            lines.append(f"{method:<9} {setting:<18} {nfe:>5} {seconds:>9.3f} {FLAGS.batch_size / seconds:>10.1f} "
                         f"{seconds / nfe * 1e3:>8.2f} {tflops:>8.3f}")
            print(lines[-1])
        if FLAGS.guided:
            ratio = per_call[FLAGS.guidance_scale] / per_call[1.0]
            lines.append(f"{method:<9} guided/unguided: {ratio:.2f}x per step (target <= {GUIDED_TARGET}x: "
                         f"{'met' if ratio <= GUIDED_TARGET else 'missed'}), {ratio / 2:.2f}x per NFE")
            print(lines[-1])
    if FLAGS.out:
        with open(FLAGS.out, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
