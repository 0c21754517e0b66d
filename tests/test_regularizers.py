"""Locality and anchor regularizers: closed-form losses on analytic fields, the batched forward
call of the training loop, gradients through a UNet, centroids, refresh schedule and resume."""

import io
import itertools
import re

import pytest
import torch
import torch.nn.functional as F

from flow_matching import FM, ICFM, SI, pad_t_like_x
from regularizers import AnchorRegularizer, LocalRegularizer
from unet import UNetModel
from utils_cifar import to_model_range

# The small UNet of the other tests, on 16x16 images (a quarter of the CPU time of 32x32; nothing
# here depends on the image size).
TINY_UNET = dict(dim=(3, 16, 16), num_channels=32, num_res_blocks=1, channel_mult=(1, 2), num_head_channels=16,
                 attention_resolutions="16", dropout=0.0)


# ------------------------------------------------------------------------------------ helpers


def batched_call(field, reg, sample, cluster):
    """What Trainer.step does: one call on main ++ extra rows, split, regularizer loss."""
    t_extra, x_extra, ctx = reg.extra_inputs(sample, cluster)
    v = field(torch.cat([sample.t, t_extra]), torch.cat([sample.xt, x_extra]))
    batch = sample.t.shape[0]
    vt, v_extra = v[:batch], v[batch:]
    return vt, reg.loss(sample, vt, v_extra, ctx)


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


def recover_permutation(s, u):
    """perm such that s == u[perm] (rows of u are distinct)."""
    perm = torch.cdist(s.flatten(1), u.flatten(1)).argmin(1)
    assert torch.equal(perm.sort().values, torch.arange(len(u)))
    torch.testing.assert_close(s, u[perm])
    return perm


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


def test_local_inputs_are_the_line_at_fresh_t_and_a_permutation():
    torch.manual_seed(0)
    u = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    sample = make_sample(u, sigma=0.3)
    reg = LocalRegularizer(weight=1.0, sigma=0.3)
    torch.manual_seed(1)
    t_extra, x_extra, _ = reg.extra_inputs(sample, torch.zeros(6, dtype=torch.long))
    assert t_extra.shape == (12,) and x_extra.shape == (12, 3, 4, 4)
    t = t_extra[:6]
    assert torch.equal(t_extra[6:], t)
    assert not torch.equal(t, sample.t)  # a fresh t, not the main term's
    torch.testing.assert_close(x_extra[:6], line(t, u, sample.x0, sample.eps, 0.3))
    s = (x_extra[6:] - pad_t_like_x(1 - t, u) * sample.x0 - 0.3 * sample.eps) / pad_t_like_x(t, u)
    perm = recover_permutation(s, u)
    # drawn from the global RNG: t first, then the permutation
    torch.manual_seed(1)
    torch.testing.assert_close(t, torch.rand(6, dtype=torch.float64))
    assert torch.equal(perm, torch.randperm(6))


def test_local_loss_closed_form():
    torch.manual_seed(0)
    u = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    cluster = torch.zeros(6, dtype=torch.long)

    # v = x / t is the target field of the lines from x0 = 0 (sigma = 0): v(u_t) = u, v(s_t) = s
    reg = LocalRegularizer(weight=1.0, sigma=0.0)
    _, loss = batched_call(over_t, reg, make_sample(u, 0.0, zero_noise=True), cluster)
    assert loss.item() < 1e-25

    # v = 2x: v(u_t) - v(s_t) = 2t (u - s) whatever x0 and eps, so loss = mean((2t - 1)^2 (u - s)^2)
    reg = LocalRegularizer(weight=1.0, sigma=0.3)
    sample = make_sample(u, 0.3)
    torch.manual_seed(2)
    t_extra, x_extra, ctx = reg.extra_inputs(sample, cluster)
    t = t_extra[:6]
    s = (x_extra[6:] - pad_t_like_x(1 - t, u) * sample.x0 - 0.3 * sample.eps) / pad_t_like_x(t, u)
    s = u[recover_permutation(s, u)]
    expected = (pad_t_like_x(2 * t - 1, u) * (u - s)).square().mean()
    assert expected > 0.1
    torch.manual_seed(2)  # same t and permutation
    vt, loss = batched_call(double, reg, sample, cluster)
    torch.testing.assert_close(loss, expected)
    # the main prediction is not needed (monitoring calls it with vt=None)
    torch.testing.assert_close(reg.loss(sample, None, double(t_extra, x_extra), ctx), expected)

    # a batch of one repeated image: s = u, so the loss is 0 for any field
    same = make_sample(u[:1].expand(6, -1, -1, -1).clone(), 0.3)
    assert batched_call(double, reg, same, cluster)[1].item() == 0.0


# ------------------------------------------------------------------------ anchor: closed form


@pytest.fixture
def anchor_batch():
    """(images, assignment, x1 [4,...] from cluster 1 in float64, cluster [4], centroid e of cluster 1)."""
    images, assignment = clustered_images([3, 5, 4])
    x1 = to_model_range(images[assignment == 1][:4]).double()
    e = naive_centroid(images, assignment, 1)
    return images, assignment, x1, torch.full((4,), 1), e


@pytest.mark.parametrize("reuse_xt", [True, False])
def test_anchor_losses_closed_form(anchor_batch, reuse_xt):
    images, assignment, x1, cluster, e = anchor_batch
    mse = lambda a: a.square().mean()  # noqa: E731

    def loss(loss_type, field, sigma, zero_noise):
        reg = anchor(images, assignment, 3, loss_type=loss_type, sigma=sigma, reuse_xt=reuse_xt, centroid_samples=0)
        reg.before_step(0)
        sample = make_sample(x1, sigma, zero_noise=zero_noise)
        t_extra, x_extra, _ = reg.extra_inputs(sample, cluster)
        assert len(t_extra) == len(x_extra) == (4 if reuse_xt else 8)
        return batched_call(field, reg, sample, cluster)[1], pad_t_like_x(sample.t, x1)

    # v = x / t (target field of lines from x0 = 0): v(x_t) = x1, v(e_t) = e
    full, _ = loss("full", over_t, 0.0, True)
    simple, _ = loss("simple", over_t, 0.0, True)
    assert full.item() < 1e-25
    torch.testing.assert_close(simple, mse(x1 - e))
    assert simple > 0.01
    # a constant field: v(x_t) = v(e_t)
    assert loss("simple", constant, 0.2, False)[0].item() == 0.0
    torch.testing.assert_close(loss("full", constant, 0.2, False)[0], mse(e - x1))
    # v = 2x: v(x_t) - v(e_t) = 2t (x1 - e) whatever x0 and eps
    full, t = loss("full", double, 0.2, False)
    simple, _ = loss("simple", double, 0.2, False)
    torch.testing.assert_close(full, mse((2 * t - 1) * (x1 - e)))
    torch.testing.assert_close(simple, mse(2 * t * (x1 - e)))


def test_anchor_inputs_use_the_main_terms_t_noise_and_centroid(anchor_batch):
    images, assignment, x1, cluster, e = anchor_batch
    sample = make_sample(x1, 0.2)
    reg = anchor(images, assignment, 3, sigma=0.2, reuse_xt=False, centroid_samples=0)
    reg.before_step(0)
    t_extra, x_extra, ctx = reg.extra_inputs(sample, cluster)
    assert torch.equal(t_extra, torch.cat([sample.t, sample.t]))
    torch.testing.assert_close(x_extra[:4], sample.xt)  # the icfm xt is the line through x1
    torch.testing.assert_close(x_extra[4:], line(sample.t, e.expand_as(x1), sample.x0, sample.eps, 0.2))
    torch.testing.assert_close(ctx, e.expand_as(x1))


def test_bad_anchor_loss_type():
    images, assignment = clustered_images([2, 2])
    message = "--anchor_loss_type must be full or simple, got 'x'."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        anchor(images, assignment, 2, loss_type="x")


# ------------------------------------------------------------------------------ with a UNet


def unet_batch(sigma=0.1, batch=3, seed=0):
    """uint8 images in 3 clusters, an icfm sample of `batch` images of cluster 2, the cluster ids."""
    images, assignment = clustered_images([4, 3, 5], shape=(3, 16, 16), seed=seed)
    x1 = to_model_range(images[assignment == 2][:batch])
    torch.manual_seed(seed)
    sample = ICFM(sigma).sample(torch.randn_like(x1), x1)
    return images, assignment, sample, torch.full((batch,), 2)


def make_reg(kind, images, assignment, sigma=0.1):
    if kind == "local":
        return LocalRegularizer(weight=0.5, sigma=sigma)
    loss_type, reuse = kind.split("_")[1:]
    reg = anchor(images, assignment, 3, weight=0.5, sigma=sigma, loss_type=loss_type,
                 reuse_xt=reuse == "reuse", centroid_samples=0)
    reg.before_step(0)
    return reg


REG_KINDS = ["local", "anchor_full_reuse", "anchor_simple_reuse", "anchor_full_noreuse", "anchor_simple_noreuse"]


@pytest.mark.parametrize("kind", ["local", "anchor_full_reuse", "anchor_simple_noreuse"])
def test_gradients_reach_every_parameter(tiny_net, kind):
    images, assignment, sample, cluster = unet_batch()
    reg = make_reg(kind, images, assignment)
    net = tiny_net
    torch.manual_seed(1)
    vt, reg_loss = batched_call(net, reg, sample, cluster)
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
    images, assignment, sample, cluster = unet_batch()
    reg = make_reg(kind, images, assignment)
    net = tiny_net
    t, x0, x1, eps = sample.t, sample.x0, sample.x1, sample.eps
    with torch.no_grad():
        torch.manual_seed(1)  # permutation [2, 0, 1]: no fixed point
        _, batched = batched_call(net, reg, sample, cluster)
        if kind == "local":
            torch.manual_seed(1)
            t_fresh = torch.rand(3)
            s = x1[torch.randperm(3)]
            v_u = net(t_fresh, line(t_fresh, x1, x0, eps, 0.1))
            v_s = net(t_fresh, line(t_fresh, s, x0, eps, 0.1))
            separate = (v_u - v_s + s - x1).square().mean()
        else:
            e = naive_centroid(images, assignment, 2).float().expand_as(x1)
            v_x = net(t, line(t, x1, x0, eps, 0.1))
            v_e = net(t, line(t, e, x0, eps, 0.1))
            diff = v_x - v_e + (e - x1 if "full" in kind else 0)
            separate = diff.square().mean()
    assert separate > 1e-4
    torch.testing.assert_close(batched, separate, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss_type", ["full", "simple"])
def test_no_reuse_ignores_the_main_path_and_matches_reuse_on_icfm(tiny_net, loss_type):
    images, assignment, sample, cluster = unet_batch(sigma=0.2)
    reuse = anchor(images, assignment, 3, sigma=0.2, loss_type=loss_type, reuse_xt=True, centroid_samples=0)
    no_reuse = anchor(images, assignment, 3, sigma=0.2, loss_type=loss_type, reuse_xt=False, centroid_samples=0)
    reuse.before_step(0)
    no_reuse.before_step(0)
    t, x0, x1, eps = sample.t, sample.x0, sample.x1, sample.eps
    with torch.no_grad():
        expected = batched_call(tiny_net, reuse, ICFM(0.2).path(t, x0, x1, eps), cluster)[1]
        for matcher in (ICFM(0.2), FM(0.2), SI(0.2)):
            got = batched_call(tiny_net, no_reuse, matcher.path(t, x0, x1, eps), cluster)[1]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # reusing the fm prediction instead would be wrong: the check above is not vacuous
        wrong = batched_call(tiny_net, reuse, FM(0.2).path(t, x0, x1, eps), cluster)[1]
    assert (wrong - expected).abs() > 1e-4


# -------------------------------------------------------------------------------- centroids


SIZES = [6, 5, 2, 0, 7]  # cluster 3 is empty


def test_centroids_equal_naive_means():
    images, assignment = clustered_images(SIZES)
    for centroid_samples in (0, 7, 100):  # all members, and subsets at least as large as every cluster
        reg = anchor(images, assignment, 5, centroid_samples=centroid_samples)
        reg.before_step(0)
        assert reg.centroids.shape == (5, 3, 4, 4) and reg.centroids.dtype == torch.float32
        for k in range(5):
            torch.testing.assert_close(reg.centroids[k].double(), naive_centroid(images, assignment, k),
                                       atol=1e-6, rtol=0)
    assert torch.equal(reg.centroids[3], torch.zeros(3, 4, 4))


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
