"""The published ``utils_cifar`` helpers (TorchCFM CIFAR-10 example and its locality fork): the published import surface.

Where each name lives in ``cfm``:

    ema                 cfm.training.trainer.ema_update (one fused lerp), over the state dict
    generate_samples    cfm.evaluation.solvers.integrate (Euler) + cfm.evaluation.sampling.write_image_grid
    infiniteloop        here (three lines)
    setup               torch.distributed.init_process_group; the scripts use cfm.io.distributed.init_world
    compute_local_loss  cfm.method.regularizers.LocalRegularizer (the training scripts' locality loss)
    visualize_clusters  cfm.method.samplers.save_cluster_grids (the training scripts' --visualize)
"""

import os

import torch
import torch.distributed as dist

from cfm.evaluation.sampling import write_image_grid
from cfm.evaluation.solvers import integrate
from cfm.method.regularizers import LocalRegularizer
from cfm.method.samplers import save_cluster_grids
from cfm.training.trainer import ema_update
from samplers import dataset_images


def ema(source, target, decay):
    """target <- decay * target + (1 - decay) * source, entry by entry over the state dicts.

    Buffers are included. Floating-point entries are averaged; integer ones (e.g. BatchNorm's
    ``num_batches_tracked`` counter, which has no average) are copied from source.
    """
    source_dict, target_dict = source.state_dict(), target.state_dict()
    floats = [key for key, value in target_dict.items() if value.is_floating_point()]
    # state_dict() tensors share storage with the modules' parameters and buffers: updated in place.
    ema_update([target_dict[k] for k in floats], [source_dict[k] for k in floats], decay)
    for key in target_dict.keys() - set(floats):
        target_dict[key].copy_(source_dict[key])


def generate_samples(model, parallel, savedir, step, net_="normal"):
    """Write an 8x8 grid of 64 samples to ``f"{savedir}{net_}_generated_FM_images_step_{step}.png"``.

    x0 ~ N(0, I) [64, 3, 32, 32] from torch's global RNG on the model's device; 99 Euler steps of
    dx/dt = model(t, x) on t = linspace(0, 1, 100), in eval mode without autograd; x1 clipped to
    [-1, 1] and mapped to [0, 1] (x / 2 + 0.5). ``savedir`` is concatenated, not joined, as published
    (end it with "/"). ``parallel``: the model is a DataParallel / DDP wrapper, sample its
    ``.module``. The model is left in train mode. Returns the path written.
    """
    net = model.module if parallel else model
    net.eval()
    x0 = torch.randn(64, 3, 32, 32, device=next(net.parameters()).device)
    with torch.inference_mode():
        x1, _ = integrate(net, x0, method="euler", steps=99)
    path = write_image_grid(f"{savedir}{net_}_generated_FM_images_step_{step}.png", x1.clip(-1, 1).cpu() / 2 + 0.5, 8)
    model.train()
    return path


def infiniteloop(dataloader):
    """Yield the x of the dataloader's (x, y) batches, epoch after epoch, forever."""
    while True:
        for x, _ in iter(dataloader):
            yield x


def setup(rank, total_num_gpus, master_addr="localhost", master_port="12355", backend="nccl"):
    """Join the process group: MASTER_ADDR / MASTER_PORT set, then ``init_process_group(backend,
    rank=rank, world_size=total_num_gpus)``."""
    os.environ["MASTER_ADDR"] = master_addr
    os.environ["MASTER_PORT"] = str(master_port)
    dist.init_process_group(backend, rank=rank, world_size=total_num_gpus)


def compute_local_loss(net_model, x1, x0, sigma=0.0):
    """The locality loss of the training scripts, a scalar tensor (with autograd).

    With u = x1 [B, ...] (one cluster), s = u[perm] for a random permutation, t ~ U(0, 1) [B] and
    eps ~ N(0, I) shared by both lines, drawn in that order (t, perm, eps) from torch's global RNG::

        u_t = t u + (1 - t) x0 + sigma eps,   s_t = t s + (1 - t) x0 + sigma eps
        loss = mean (v(u_t, t) - v(s_t, t) + s - u)^2

    ``net_model`` is called once on the 2B rows (u_t then s_t): GroupNorm is per sample, so this is
    the two evaluations of the formula.
    """
    regularizer = LocalRegularizer(weight=1.0, sigma=sigma)
    t, x, u_minus_s, _ = regularizer.extra_inputs(x1, x0, None)
    return regularizer.loss(None, net_model(t, x), u_minus_s)


def visualize_clusters(class_sampler, dataset, output_dir="./group", samples_per_class=64, grid_nrow=8):
    """Write what the training scripts' --visualize writes for ``class_sampler``'s clusters of
    ``dataset``: one PNG grid (``grid_nrow`` per row) of the first ``samples_per_class`` members of
    each non-empty cluster, named ``class_{id:03d}_orig_{class}_sub_{sub:02d}.png``
    (``class_{id:03d}.png`` with one sub-cluster), and ``README.txt`` with the cluster sizes."""
    images, labels = dataset_images(dataset)
    save_cluster_grids(images, labels, class_sampler.assignment, class_sampler.num_subclasses, output_dir,
                       max_per_cluster=samples_per_class, nrow=grid_nrow)
