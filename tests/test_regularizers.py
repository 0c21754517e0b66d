"""Locality and anchor regularizers: closed-form losses on analytic fields, the batched forward
call of the training loop, gradients through a UNet, the published formulas on the batch as drawn,
centroids, refresh schedule and resume."""

import io
import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SUBPROCESS_TIMEOUT_S

from cfm.config import ExecutionConfig, OptimConfig
from cfm.io.cifar10 import to_model_range
from cfm.io.distributed import World
from cfm.method.flow_matching import FM, ICFM, SI, make_matcher, pad_t_like_x
from cfm.method.regularizers import AnchorRegularizer, LocalRegularizer
from cfm.method.unet import UNetModel
from cfm.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
# float64 results with float64 centroids: equal to a few hundred ulps (float32 centroids would be off by ~1e-8).
F64 = dict(rtol=1e-13, atol=1e-13)
# The small UNet of the other tests, on 16x16 images (a quarter of the CPU time of 32x32; nothing
# here depends on the image size).
TINY_UNET = dict(dim=(3, 16, 16), num_channels=32, num_res_blocks=1, channel_mult=(1, 2), num_head_channels=16,
                 attention_resolutions="16", dropout=0.0)


# ------------------------------------------------------------------------------------ helpers


def batched_call(field, reg, x1, x0, cluster, sample):
    """What Trainer.step does: one call on main ++ extra rows, split, regularizer loss."""
    t_extra, x_extra, ctx, _ = reg.extra_inputs(x1, x0, cluster, sample)
    v = field(torch.cat([sample.t, t_extra]), torch.cat([sample.xt, x_extra]))
    batch = sample.t.shape[0]
    vt, v_extra = v[:batch], v[batch:]
    return vt, reg.loss(vt, v_extra, ctx)


def over_t(t, x):
    """v(t, x) = x / t: on the line t z + (1 - t) 0 it returns z, the target when x0 = 0, sigma = 0."""
    return x / pad_t_like_x(t, x)


def double(t, x):
    return 2 * x


def constant(t, x):
    return torch.full_like(x, 0.3)


def line(t, z, x0, eps, sigma):
    t = pad_t_like_x(t, z)
    return t * z + (1 - t) * x0 + sigma * eps


def make_sample(x1, sigma, zero_noise=False, seed=0):
    """An icfm FlowSample (float64) with t in [0.1, 0.9] so that x / t stays tame."""
    g = torch.Generator().manual_seed(seed)
    t = 0.1 + 0.8 * torch.rand(x1.shape[0], generator=g, dtype=x1.dtype)
    x0 = torch.zeros_like(x1) if zero_noise else torch.randn(x1.shape, generator=g, dtype=x1.dtype)
    eps = torch.randn(x1.shape, generator=g, dtype=x1.dtype)
    return ICFM(sigma).path(t, x0, x1, eps)


def local_draws(seed, batch, like):
    """The fresh t, permutation and eps a LocalRegularizer draws after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return torch.rand(batch, dtype=like.dtype), torch.randperm(batch), torch.randn_like(like)


def clustered_images(sizes, shape=(3, 4, 4), seed=0):
    """Random uint8 images [N, *shape] and the cluster id of each: sizes[k] members of cluster k,
    interleaved so members are not contiguous."""
    g = torch.Generator().manual_seed(seed)
    assignment = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    assignment = assignment[torch.randperm(len(assignment), generator=g)]
    images = torch.randint(0, 256, (len(assignment), *shape), generator=g, dtype=torch.uint8)
    return images, assignment


def naive_centroid(images, assignment, k):
    """Mean of the members and of their mirror images (training flips each image with p = 1/2)."""
    members = images[assignment == k].double() / 127.5 - 1
    members = torch.cat([members, members.flip(-1)])
    return members.mean(0) if len(members) else torch.zeros(images.shape[1:], dtype=torch.float64)


def anchor(images, assignment, num_clusters, **kwargs):
    kwargs = {"weight": 1.0, "sigma": 0.0, "loss_type": "full", **kwargs}
    return AnchorRegularizer(images=images, assignment=assignment, num_clusters=num_clusters, **kwargs)


@pytest.fixture(scope="module")
def tiny_net():
    """Tiny UNet whose zero-initialised tensors (output convs, norm biases) are randomised, so
    every parameter influences the output; eval mode."""
    torch.manual_seed(0)
    net = UNetModel(**TINY_UNET)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return net.eval()


# ------------------------------------------------------------------------- local: closed form


def test_local_inputs_are_the_drawn_batch_at_fresh_t_eps_and_a_permutation():
    torch.manual_seed(0)
    u = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    sample = make_sample(u, sigma=0.3)
    x0 = torch.randn_like(u)  # the noise as drawn (the sample's own x0 must not be used)
    reg = LocalRegularizer(weight=1.0, sigma=0.3)
    torch.manual_seed(1)
    t_extra, x_extra, ctx, rows = reg.extra_inputs(u, x0, torch.zeros(6, dtype=torch.long), sample)
    t, perm, eps = local_draws(1, 6, u)
    assert not torch.equal(t, sample.t) and not torch.equal(eps, sample.eps)  # fresh, not the main term's
    assert torch.equal(t_extra, torch.cat([t, t]))
    torch.testing.assert_close(x_extra, torch.cat([line(t, u, x0, eps, 0.3), line(t, u[perm], x0, eps, 0.3)]))
    torch.testing.assert_close(ctx, u - u[perm])
    assert torch.equal(rows, torch.cat([torch.arange(6), perm]))  # the image each extra row evaluates
    # nothing of the main draw is used: the monitor calls it with sample=None
    torch.manual_seed(1)
    assert torch.equal(reg.extra_inputs(u, x0, None, None)[1], x_extra)


def test_local_loss_closed_form():
    torch.manual_seed(0)
    u = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    cluster = torch.zeros(6, dtype=torch.long)

    # v = x / t is the target field of the lines from x0 = 0 (sigma = 0): v(u_t) = u, v(s_t) = s
    reg = LocalRegularizer(weight=1.0, sigma=0.0)
    sample = make_sample(u, 0.0, zero_noise=True)
    _, loss = batched_call(over_t, reg, u, sample.x0, cluster, sample)
    assert loss.item() < 1e-25

    # v = 2x: v(u_t) - v(s_t) = 2t (u - s) whatever x0 and eps, so loss = mean((2t - 1)^2 (u - s)^2)
    reg = LocalRegularizer(weight=1.0, sigma=0.3)
    sample = make_sample(u, 0.3)
    t, perm, _ = local_draws(2, 6, u)
    expected = (pad_t_like_x(2 * t - 1, u) * (u - u[perm])).square().mean()
    assert expected > 0.1
    torch.manual_seed(2)  # same t and permutation
    _, loss = batched_call(double, reg, u, sample.x0, cluster, sample)
    torch.testing.assert_close(loss, expected)
    # the main prediction is not needed (monitoring calls it with vt=None)
    torch.manual_seed(2)
    t_extra, x_extra, ctx, _ = reg.extra_inputs(u, sample.x0, cluster, None)
    torch.testing.assert_close(reg.loss(None, double(t_extra, x_extra), ctx), expected)

    # a batch of one repeated image: s = u, so the loss is 0 for any field
    same = u[:1].expand(6, -1, -1, -1).clone()
    assert batched_call(double, reg, same, sample.x0, cluster, make_sample(same, 0.3))[1].item() == 0.0


# ------------------------------------------------------------------------ anchor: closed form


@pytest.fixture
def anchor_batch():
    """(images, assignment, x1 [4,...] from cluster 1 in float64, cluster [4], centroid e of cluster 1)."""
    images, assignment = clustered_images([3, 5, 4])
    x1 = to_model_range(images[assignment == 1][:4]).double()
    e = naive_centroid(images, assignment, 1)
    return images, assignment, x1, torch.full((4,), 1), e


@pytest.mark.parametrize("pairing", ["published", "main"])
def test_anchor_losses_closed_form(anchor_batch, pairing):
    images, assignment, x1, cluster, e = anchor_batch
    mse = lambda a: a.square().mean()  # noqa: E731

    def loss(loss_type, field, sigma, zero_noise):
        reg = anchor(images, assignment, 3, loss_type=loss_type, sigma=sigma, pairing=pairing, centroid_samples=0,
                     centroid_dtype=torch.float64)
        reg.before_step(0)
        sample = make_sample(x1, sigma, zero_noise=zero_noise)
        t_extra, x_extra, _, _ = reg.extra_inputs(x1, sample.x0, cluster, sample)
        assert len(t_extra) == len(x_extra) == (4 if pairing == "main" else 8)
        return batched_call(field, reg, x1, sample.x0, cluster, sample)[1], pad_t_like_x(sample.t, x1)

    # v = x / t (target field of lines from x0 = 0): v(x_t) = x1, v(e_t) = e
    full, _ = loss("full", over_t, 0.0, True)
    simple, _ = loss("simple", over_t, 0.0, True)
    assert full.item() < 1e-25
    torch.testing.assert_close(simple, mse(x1 - e), **F64)
    assert simple > 0.01
    # a constant field: v(x_t) = v(e_t)
    assert loss("simple", constant, 0.2, False)[0].item() == 0.0
    torch.testing.assert_close(loss("full", constant, 0.2, False)[0], mse(e - x1), **F64)
    # v = 2x: v(x_t) - v(e_t) = 2t (x1 - e) whatever x0 and eps
    full, t = loss("full", double, 0.2, False)
    simple, _ = loss("simple", double, 0.2, False)
    torch.testing.assert_close(full, mse((2 * t - 1) * (x1 - e)), **F64)
    torch.testing.assert_close(simple, mse(2 * t * (x1 - e)), **F64)


def test_anchor_inputs_published_and_main(anchor_batch):
    images, assignment, x1, cluster, e = anchor_batch
    sample = make_sample(x1, 0.2)
    x0 = torch.randn_like(x1)  # the noise as drawn, not the sample's
    e = e.expand_as(x1)
    published = anchor(images, assignment, 3, sigma=0.2, centroid_samples=0, centroid_dtype=torch.float64)
    published.before_step(0)
    torch.manual_seed(3)
    t_extra, x_extra, (e_got, x1_got), rows = published.extra_inputs(x1, x0, cluster, sample)
    torch.manual_seed(3)
    eps = torch.randn_like(x1)  # a fresh eps, shared by both rows
    assert torch.equal(t_extra, torch.cat([sample.t, sample.t]))  # the main term's t
    torch.testing.assert_close(x_extra, torch.cat([line(sample.t, x1, x0, eps, 0.2), line(sample.t, e, x0, eps, 0.2)]),
                               **F64)
    torch.testing.assert_close(e_got, e, **F64)
    assert x1_got is x1 and torch.equal(rows, torch.arange(len(x1)).repeat(2))

    main = anchor(images, assignment, 3, sigma=0.2, centroid_samples=0, pairing="main", centroid_dtype=torch.float64)
    main.before_step(0)
    t_extra, x_extra, (_, x1_got), rows = main.extra_inputs(x1, x0, cluster, sample)
    assert torch.equal(rows, torch.arange(len(x1)))  # make_sample keeps the order (index None)
    assert torch.equal(t_extra, sample.t) and x1_got is sample.x1
    torch.testing.assert_close(x_extra, line(sample.t, e, sample.x0, sample.eps, 0.2), **F64)


def test_bad_anchor_loss_type_and_pairing():
    images, assignment = clustered_images([2, 2])
    message = "--anchor_loss_type must be full or simple, got 'x'."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        anchor(images, assignment, 2, loss_type="x")
    with pytest.raises(ValueError, match="^--anchor_pairing must be published or main, got 'x'.$"):
        anchor(images, assignment, 2, pairing="x")


@pytest.mark.parametrize("model", ["fm", "si"])
def test_main_anchor_pairing_is_refused_for_curved_paths(model, tmp_path):
    result = subprocess.run([sys.executable, "train_cifar10_anchor.py", f"--model={model}", "--anchor_pairing=main",
                             f"--output_dir={tmp_path}", f"--data_dir={tmp_path}/none"],
                            cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"error: --anchor_pairing=main reuses the main term's straight-line x_t, which --model={model} does not "
        "train on: use --anchor_pairing=published or --model=icfm/otcfm."]
    assert not any(tmp_path.iterdir())  # refused before any work


# ------------------------------------------------------------------------------ with a UNet


def unet_batch(sigma=0.1, batch=3, seed=0):
    """uint8 images in 3 clusters, `batch` images x1 of cluster 2 with noise x0 as drawn, their icfm
    sample, the cluster ids."""
    images, assignment = clustered_images([4, 3, 5], shape=(3, 16, 16), seed=seed)
    x1 = to_model_range(images[assignment == 2][:batch])
    torch.manual_seed(seed)
    x0 = torch.randn_like(x1)
    return images, assignment, x1, x0, ICFM(sigma).sample(x0, x1), torch.full((batch,), 2)


def make_reg(kind, images, assignment, sigma=0.1):
    if kind == "local":
        return LocalRegularizer(weight=0.5, sigma=sigma)
    loss_type, pairing = kind.split("_")[1:]
    reg = anchor(images, assignment, 3, weight=0.5, sigma=sigma, loss_type=loss_type, pairing=pairing,
                 centroid_samples=0)
    reg.before_step(0)
    return reg


REG_KINDS = ["local", "anchor_full_published", "anchor_simple_published", "anchor_full_main", "anchor_simple_main"]


@pytest.mark.parametrize("kind", ["local", "anchor_full_main", "anchor_simple_published"])
def test_gradients_reach_every_parameter(tiny_net, kind):
    images, assignment, x1, x0, sample, cluster = unet_batch()
    reg = make_reg(kind, images, assignment)
    net = tiny_net
    torch.manual_seed(1)
    vt, reg_loss = batched_call(net, reg, x1, x0, cluster, sample)
    loss = F.mse_loss(vt, sample.ut) + reg.weight * reg_loss
    params = dict(net.named_parameters())
    reg_grads = dict(zip(params, torch.autograd.grad(reg_loss, list(params.values()), retain_graph=True)))
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    for name in params:
        assert torch.isfinite(grads[name]).all(), name
        assert grads[name].abs().sum() > 0, name
        if name == "out.2.bias":
            # both losses see the net only through a difference of two outputs: the output bias cancels
            assert reg_grads[name].abs().max() < 1e-6
        else:
            assert reg_grads[name].abs().sum() > 0, name  # the regularizer itself reaches it


@pytest.mark.parametrize("kind", REG_KINDS)
def test_batched_call_equals_separate_calls(tiny_net, kind):
    """The loss from the loop's one concatenated call equals the formula evaluated with one net
    call per part (GroupNorm and attention are per sample)."""
    images, assignment, x1, x0, sample, cluster = unet_batch()
    reg = make_reg(kind, images, assignment)
    net = tiny_net
    with torch.no_grad():
        torch.manual_seed(1)  # permutation [2, 0, 1]: no fixed point
        _, batched = batched_call(net, reg, x1, x0, cluster, sample)
        if kind == "local":
            t, perm, eps = local_draws(1, 3, x1)
            s = x1[perm]
            v_u = net(t, line(t, x1, x0, eps, 0.1))
            v_s = net(t, line(t, s, x0, eps, 0.1))
            separate = (v_u - v_s + s - x1).square().mean()
        else:
            e = naive_centroid(images, assignment, 2).float().expand_as(x1)
            if kind.endswith("main"):
                t, x0_, eps = sample.t, sample.x0, sample.eps
            else:
                torch.manual_seed(1)
                t, x0_, eps = sample.t, x0, torch.randn_like(x1)
            v_x = net(t, line(t, x1, x0_, eps, 0.1))
            v_e = net(t, line(t, e, x0_, eps, 0.1))
            diff = v_x - v_e + (e - x1 if "full" in kind else 0)
            separate = diff.square().mean()
    assert separate > 1e-4
    torch.testing.assert_close(batched, separate, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss_type", ["full", "simple"])
def test_published_pairing_ignores_the_main_path_and_matches_main_on_icfm(tiny_net, loss_type):
    """With sigma = 0 (eps has no effect) and no re-pairing, the published anchor term of icfm is the
    main-pairing one; for fm and si, whose main xt is another path, the published term is unchanged."""
    images, assignment, x1, x0, sample, cluster = unet_batch(sigma=0.0)
    main = make_reg(f"anchor_{loss_type}_main", images, assignment, sigma=0.0)
    published = make_reg(f"anchor_{loss_type}_published", images, assignment, sigma=0.0)
    t, eps = sample.t, sample.eps
    with torch.no_grad():
        expected = batched_call(tiny_net, main, x1, x0, cluster, ICFM(0.0).path(t, x0, x1, eps))[1]
        for matcher in (ICFM(0.0), FM(0.0), SI(0.0)):
            got = batched_call(tiny_net, published, x1, x0, cluster, matcher.path(t, x0, x1, eps))[1]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # main pairing on the si prediction would be wrong: the check above is not vacuous (fm with
        # sigma = 0 is the icfm line itself)
        wrong = batched_call(tiny_net, main, x1, x0, cluster, SI(0.0).path(t, x0, x1, eps))[1]
    assert (wrong - expected).abs() > 1e-4


# ------------------------------------------------- the training step computes the published terms


class FixedBatch:
    """A batch source that always yields one float64 single-cluster batch (no randomness of its own)."""

    single_cluster = True

    def __init__(self, x1, cluster):
        self.x1, self.cluster = x1, cluster

    def next_batch(self):
        return self.x1, self.cluster

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def published_local_loss(net, x1, x0, sigma):
    """The published compute_local_loss(net, x1, x0), written out: fresh t, permutation, fresh eps."""
    t = torch.rand(x1.shape[0], dtype=x1.dtype)
    s = x1[torch.randperm(x1.shape[0])]
    eps = torch.randn_like(x1)
    u_t, s_t = line(t, x1, x0, eps, sigma), line(t, s, x0, eps, sigma)
    return (net(t, u_t) - net(t, s_t) + s - x1).square().mean()


def published_anchor_loss(net, x1, x0, t, e, sigma, loss_type):
    """The published anchor term, written out: the batch and noise as drawn, the main t, fresh eps."""
    eps = torch.randn_like(x1)
    diff = net(t, line(t, x1, x0, eps, sigma)) - net(t, line(t, e, x0, eps, sigma))
    return (diff + (e - x1 if loss_type == "full" else 0)).square().mean()


@pytest.mark.parametrize("kind", ["local", "anchor_full", "anchor_simple"])
def test_otcfm_step_computes_the_published_formulas_on_the_batch_as_drawn(kind, one_thread):
    """float64 (net, batch and centroids), dropout off: the loss a training step logs equals the
    published formula evaluated directly on the pre-pairing batch and noise, with the same random
    draws (to 1e-13)."""
    sigma = 0.1
    images, assignment = clustered_images([4, 12, 5], shape=(3, 16, 16))
    x1 = to_model_range(images[assignment == 1][:8]).double()  # 8 distinct images of cluster 1
    cluster = torch.full((8,), 1)
    torch.manual_seed(0)
    net = UNetModel(**TINY_UNET).double().eval()
    with torch.no_grad():  # randomise the zero-initialised output layer, so the net's terms are not 0
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    if kind == "local":
        reg = LocalRegularizer(weight=1.0, sigma=sigma)
    else:
        reg = anchor(images, assignment, 3, sigma=sigma, loss_type=kind.split("_")[1], centroid_samples=0,
                     centroid_dtype=torch.float64)
    matcher = make_matcher("otcfm", sigma)  # replacement pairing: the re-paired batch repeats images
    ema = UNetModel(**TINY_UNET).double().eval()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    optim = OptimConfig(grad_clip=1.0, ema_decay=0.99, batch_size=8, seed=7)
    execution = ExecutionConfig(precision="fp32", ot_pipeline=False)
    world = World(rank=0, size=1, device=torch.device("cpu"))
    trainer = Trainer(net, ema, optimizer, scheduler, matcher, FixedBatch(x1, cluster), optim, execution, world, reg)

    seen = []
    extra_inputs = reg.extra_inputs
    reg.extra_inputs = lambda *args, **kwargs: seen.append(args) or extra_inputs(*args, **kwargs)
    logged = trainer.step(0, with_metrics=True)[f"{reg.name}_loss"]

    # Replay the step's draws up to the regularizer, then evaluate the published formula.
    reference = UNetModel(**TINY_UNET).double().eval()
    reference.load_state_dict(before)
    torch.manual_seed(7)  # the step's draws all come from its generator, seeded with --seed
    x0 = torch.randn_like(x1)
    sample = matcher.sample(x0, x1)
    assert len({tuple(r.flatten().tolist()) for r in sample.x1}) < 8  # re-pairing repeated images
    with torch.no_grad():
        if kind == "local":
            expected = published_local_loss(reference, x1, x0, sigma)
        else:
            reg.before_step(0)
            e = naive_centroid(images, assignment, 1).expand_as(x1)
            expected = published_anchor_loss(reference, x1, x0, sample.t, e, sigma, kind.split("_")[1])
    assert expected > 1e-4
    torch.testing.assert_close(logged, expected, **F64)
    # the regularizer got the drawn batch: each of the 8 images once, no row duplicated by re-pairing
    (x1_seen, x0_seen, _, _), = seen
    assert torch.equal(x1_seen, x1) and torch.equal(x0_seen, x0)
    assert len({tuple(r.flatten().tolist()) for r in x1_seen}) == 8


# -------------------------------------------------------------------------------- centroids


SIZES = [6, 5, 2, 0, 7]  # cluster 3 is empty


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_centroids_equal_naive_means(dtype):
    """To float32 rounding, or in float64 to 1e-13."""
    images, assignment = clustered_images(SIZES)
    tolerance = F64 if dtype == torch.float64 else dict(atol=1e-6, rtol=0)
    for centroid_samples in (0, 7, 100):  # all members, and subsets at least as large as every cluster
        kwargs = {} if dtype == torch.float32 else {"centroid_dtype": dtype}  # float32: the default
        reg = anchor(images, assignment, 5, centroid_samples=centroid_samples, **kwargs)
        reg.before_step(0)
        assert reg.centroids.shape == (5, 3, 4, 4) and reg.centroids.dtype == dtype
        for k in range(5):
            torch.testing.assert_close(reg.centroids[k].double(), naive_centroid(images, assignment, k), **tolerance)
    assert torch.equal(reg.centroids[3], torch.zeros(3, 4, 4, dtype=dtype))


def test_centroids_keep_their_dtype_when_loaded():
    """A regularizer loads stored centroids in its own centroid dtype; only float32 and float64 are taken."""
    images, assignment = clustered_images(SIZES)
    state = anchor_state_after(images, assignment, steps=[0], centroid_dtype=torch.float64)
    assert state["centroids"].dtype == torch.float64
    for dtype in (torch.float64, torch.float32):
        loaded = anchor(images, assignment, 5, centroid_dtype=dtype)
        loaded.load_state_dict(state)
        assert loaded.centroids.dtype == dtype and torch.equal(loaded.centroids, state["centroids"].to(dtype))
    with pytest.raises(ValueError, match="centroid_dtype must be torch.float32 or torch.float64, got torch.float16"):
        anchor(images, assignment, 5, centroid_dtype=torch.float16)


def test_subsampled_centroids_are_means_of_distinct_members():
    images, assignment = clustered_images(SIZES)
    model = to_model_range(images).double()
    reg = anchor(images, assignment, 5, centroid_samples=3, update_freq=1)
    seen = {k: set() for k in range(5)}
    for step in range(6):
        reg.before_step(step)
        for k, size in enumerate(SIZES):
            members = torch.nonzero(assignment == k).flatten().tolist()
            subsets = list(itertools.combinations(members, min(3, size))) if size else []
            symmetric = [(model[list(c)].mean(0) + model[list(c)].mean(0).flip(-1)) / 2 for c in subsets]
            matches = [c for c, m in zip(subsets, symmetric)
                       if torch.allclose(m, reg.centroids[k].double(), atol=1e-6)]
            if size == 0:
                assert torch.equal(reg.centroids[k], torch.zeros(3, 4, 4))
            else:
                assert len(matches) == 1, (k, step)
                seen[k].add(matches[0])
    # each refresh draws a new subset (20 to 35 possible ones per cluster); clusters of 2 use both
    assert all(len(seen[k]) > 1 for k in (0, 1, 4))
    assert len(seen[2]) == 1


def test_refresh_exactly_at_multiples_of_update_freq():
    images, assignment = clustered_images(SIZES)

    def refresh_steps(reg, steps):
        calls = []
        compute = reg.compute_centroids
        reg.compute_centroids = lambda: calls.append(step) or compute()
        for step in steps:
            reg.before_step(step)
        return calls

    assert refresh_steps(anchor(images, assignment, 5, update_freq=3), range(10)) == [0, 3, 6, 9]
    # none exist yet: computed at the first step whatever it is
    assert refresh_steps(anchor(images, assignment, 5, update_freq=3), range(4, 10)) == [4, 6, 9]
    resumed = anchor(images, assignment, 5, update_freq=3)
    resumed.load_state_dict(anchor_state_after(images, assignment, steps=range(4)))
    assert refresh_steps(resumed, range(4, 10)) == [6, 9]


def anchor_state_after(images, assignment, steps, **kwargs):
    reg = anchor(images, assignment, 5, **kwargs)
    for step in steps:
        reg.before_step(step)
    return reg.state_dict()


def test_state_dict_round_trip_continues_exactly():
    images, assignment = clustered_images(SIZES)
    kwargs = dict(update_freq=2, centroid_samples=3)
    run = anchor(images, assignment, 5, seed=0, **kwargs)
    for step in range(5):
        run.before_step(step)
    buffer = io.BytesIO()
    torch.save(run.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed = anchor(images, assignment, 5, seed=123, **kwargs)  # the seed is overridden by the state
    resumed.load_state_dict(state)
    fresh = anchor(images, assignment, 5, seed=123, **kwargs)
    assert torch.equal(resumed.centroids, run.centroids)
    history = []
    for step in range(5, 10):
        for reg in (run, resumed, fresh):
            reg.before_step(step)
        assert torch.equal(resumed.centroids, run.centroids), step
        history.append(run.centroids)
    assert not torch.equal(history[0], history[-1])  # there were refreshes to reproduce
    assert not torch.equal(fresh.centroids, run.centroids)  # which depend on the generator state


def test_load_state_dict_refuses_other_cluster_count():
    images, assignment = clustered_images(SIZES)
    state = anchor_state_after(images, assignment, steps=[0])
    other = anchor(images, assignment, 10)
    with pytest.raises(ValueError, match="num_subclasses"):
        other.load_state_dict(state)
