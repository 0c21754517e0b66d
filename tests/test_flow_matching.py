"""Tests for flow_matching.py: path maths against finite differences, OT pairing against POT/scipy."""

import math

import numpy as np
import ot
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from cfm.method.flow_matching import MATCHERS, OT_PAIRINGS, FlowSample, make_matcher, ot_pairing_indices

SHAPES = [(16, 2), (8, 3, 4, 4)]  # 2-D points and tiny images


def _tensors(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=dtype)
    x1 = torch.rand(shape, generator=g, dtype=dtype) * 4 - 1  # data: a different law than the noise
    eps = torch.randn(shape, generator=g, dtype=dtype)
    return x0, x1, eps


def _sq_cost(x0, x1):
    """[B, B] squared Euclidean cost in float64 numpy, by explicit differences (not torch.cdist)."""
    a = x0.reshape(x0.shape[0], -1).double().numpy()
    b = x1.reshape(x1.shape[0], -1).double().numpy()
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sigma", [0.0, 0.1])
@pytest.mark.parametrize("name", ["icfm", "otcfm", "fm", "si"])
def test_ut_is_time_derivative_of_xt(name, sigma, shape):
    matcher = make_matcher(name, sigma=sigma)
    x0, x1, eps = _tensors(shape, seed=0)
    t = torch.linspace(0.01, 0.99, shape[0], dtype=torch.float64)
    h = 1e-6
    plus = matcher.path(t + h, x0, x1, eps).xt
    minus = matcher.path(t - h, x0, x1, eps).xt
    fd = (plus - minus) / (2 * h)
    ut = matcher.path(t, x0, x1, eps).ut
    torch.testing.assert_close(ut, fd, rtol=0, atol=1e-8)


@pytest.mark.parametrize("sigma", [0.0, 0.1])
def test_fm_target_near_t1_is_finite_and_matches_paper_formula(sigma):
    matcher = make_matcher("fm", sigma=sigma)
    x0, x1, eps = _tensors((8, 3, 4, 4), seed=1)
    shrink = 1 - sigma

    # The cancelled form agrees with Lipman et al.'s (x1 - (1 - sigma) xt) / (1 - (1 - sigma) t) where
    # that is well conditioned.
    t = torch.linspace(0.0, 0.9, 8, dtype=torch.float64)
    s = matcher.path(t, x0, x1, eps)
    tb = t.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(s.ut, (x1 - shrink * s.xt) / (1 - shrink * tb), rtol=1e-12, atol=1e-12)

    # Close to (and at) t = 1 the target stays finite and equals d xt / d t.
    for t_val in (0.999999, 1.0):
        ut = matcher.path(t_val, x0, x1, eps).ut
        assert torch.isfinite(ut).all()
        torch.testing.assert_close(ut, x1 - shrink * x0, rtol=0, atol=1e-12)
    h = 1e-7
    t = torch.full((8,), 0.999999, dtype=torch.float64)
    fd = (matcher.path(t + h, x0, x1, eps).xt - matcher.path(t - h, x0, x1, eps).xt) / (2 * h)
    torch.testing.assert_close(matcher.path(t, x0, x1, eps).ut, fd, rtol=0, atol=1e-7)

    # float32 as in training: no catastrophic cancellation at t -> 1.
    x0f, x1f = x0.float(), x1.float()
    ut32 = matcher.path(0.999999, x0f, x1f, eps.float()).ut
    torch.testing.assert_close(ut32, x1f - shrink * x0f, rtol=1e-6, atol=1e-6)


def test_fm_sigma0_target_is_x1_minus_x0():
    x0, x1, eps = _tensors((8, 3, 4, 4), seed=2)
    s = make_matcher("fm", sigma=0.0).sample(x0, x1)
    torch.testing.assert_close(s.ut, x1 - x0, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["icfm", "fm", "si"])
def test_endpoints(name):
    matcher = make_matcher(name, sigma=0.0)
    x0, x1, eps = _tensors((8, 3, 4, 4), seed=3)
    torch.testing.assert_close(matcher.path(0.0, x0, x1, eps).xt, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(matcher.path(1.0, x0, x1, eps).xt, x1, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", MATCHERS)
def test_sample_shapes_and_t_range(name):
    x0, x1, _ = _tensors((32, 3, 4, 4), seed=4, dtype=torch.float32)
    s = make_matcher(name, sigma=0.1).sample(x0, x1, generator=torch.Generator().manual_seed(0))
    assert isinstance(s, FlowSample)
    assert s.t.shape == (32,) and s.t.dtype == torch.float32
    assert ((s.t >= 0) & (s.t <= 1)).all()
    assert len(s.t.unique()) == 32  # per-sample times, not one shared t
    for field in (s.x0, s.x1, s.xt, s.ut, s.eps):
        assert field.shape == x1.shape and field.dtype == torch.float32
    # A given t is used as is, and a scalar t applies to every sample.
    t = torch.linspace(0, 1, 32)
    assert torch.equal(make_matcher(name).sample(x0, x1, t=t).t, t)
    assert torch.equal(make_matcher(name).sample(x0, x1, t=0.25).t, torch.full((32,), 0.25))


def test_sample_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        make_matcher("icfm").sample(torch.zeros(4, 2), torch.zeros(5, 2))


@pytest.mark.parametrize("shape", [(8, 2), (24, 2), (16, 3, 4, 4), (32, 3, 4, 4)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permutation_pairing_is_optimal_permutation(shape, seed):
    x0, x1, _ = _tensors(shape, seed=seed)
    batch = shape[0]
    i, j = ot_pairing_indices(x0, x1, "permutation")
    assert i.dtype == j.dtype == torch.int64
    assert torch.equal(j, torch.arange(batch))  # data order unchanged
    assert torch.equal(i.sort().values, torch.arange(batch))  # every noise sample used once

    cost = _sq_cost(x0, x1)
    pairing_cost = cost[i.numpy(), j.numpy()].sum() / batch
    uniform = np.full(batch, 1.0 / batch)
    assert pairing_cost == pytest.approx(ot.emd2(uniform, uniform, cost), rel=1e-10)
    rows, cols = linear_sum_assignment(cost)
    assert pairing_cost == pytest.approx(cost[rows, cols].sum() / batch, rel=1e-10)
    # OT strictly improves on the given (independent) pairing for these random batches.
    assert pairing_cost < np.trace(cost) / batch


def test_permutation_pairing_float32_is_optimal():
    x0, x1, _ = _tensors((32, 3, 4, 4), seed=5, dtype=torch.float32)
    i, j = ot_pairing_indices(x0, x1, "permutation")
    cost = _sq_cost(x0, x1)
    rows, cols = linear_sum_assignment(cost)
    assert cost[i.numpy(), j.numpy()].sum() == pytest.approx(cost[rows, cols].sum(), rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replacement_pairs_lie_in_plan_support(seed):
    batch = 64
    x0, x1, _ = _tensors((batch, 3, 4, 4), seed=seed)
    uniform = np.full(batch, 1.0 / batch)
    plan = ot.emd(uniform, uniform, _sq_cost(x0, x1))
    i, j = ot_pairing_indices(x0, x1, "replacement", generator=torch.Generator().manual_seed(seed))
    assert i.shape == j.shape == (batch,)
    assert (plan[i.numpy(), j.numpy()] > 0).all()
    # Drawn with replacement: 64 draws from 64 equally likely pairs repeat some pair (1 - 64!/64^64).
    assert len(j.unique()) < batch


def test_replacement_uses_torch_rng_only():
    x0, x1, _ = _tensors((32, 2), seed=6)
    torch.manual_seed(123)
    np.random.seed(0)
    first = ot_pairing_indices(x0, x1, "replacement")
    torch.manual_seed(123)
    np.random.seed(1)  # numpy's RNG must not matter
    second = ot_pairing_indices(x0, x1, "replacement")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("pairing", OT_PAIRINGS)
def test_otcfm_sample_is_icfm_on_repaired_batch(pairing):
    sigma = 0.1
    x0, x1, _ = _tensors((16, 3, 4, 4), seed=7)
    s = make_matcher("otcfm", sigma=sigma, ot_pairing=pairing).sample(
        x0, x1, generator=torch.Generator().manual_seed(0)
    )
    t = s.t.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(s.xt, t * s.x1 + (1 - t) * s.x0 + sigma * s.eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(s.ut, s.x1 - s.x0, rtol=0, atol=0)

    # The re-paired batch consists of rows of the given batch, in an optimal pairing.
    def row_ids(rows, source):
        matches = (rows.flatten(1)[:, None, :] == source.flatten(1)[None, :, :]).all(-1)
        assert (matches.sum(1) == 1).all()
        return matches.float().argmax(1)

    i, j = row_ids(s.x0, x0), row_ids(s.x1, x1)
    cost = _sq_cost(x0, x1)
    uniform = np.full(16, 1.0 / 16)
    if pairing == "permutation":
        assert torch.equal(s.x1, x1)
        assert cost[i.numpy(), j.numpy()].mean() == pytest.approx(ot.emd2(uniform, uniform, cost), rel=1e-10)
    else:
        assert (ot.emd(uniform, uniform, cost)[i.numpy(), j.numpy()] > 0).all()


@pytest.mark.parametrize("name", MATCHERS)
def test_seeding_reproduces_and_different_seeds_differ(name):
    x0, x1, _ = _tensors((16, 3, 4, 4), seed=8, dtype=torch.float32)
    matcher = make_matcher(name, sigma=0.1)

    def draw(seed):
        return matcher.sample(x0, x1, generator=torch.Generator().manual_seed(seed))

    def draw_global(seed):
        torch.manual_seed(seed)
        return matcher.sample(x0, x1)

    fields = ("t", "x0", "x1", "xt", "ut", "eps")
    for sampler in (draw, draw_global):
        a, b, c = sampler(0), sampler(0), sampler(1)
        for field in fields:
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        assert not torch.equal(a.t, c.t) and not torch.equal(a.eps, c.eps)


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError) as info:
        make_matcher("foo")
    message = str(info.value)
    assert "'foo'" in message
    assert all(name in message for name in MATCHERS)


def test_unknown_pairing_lists_choices():
    for call in (
        lambda: make_matcher("otcfm", ot_pairing="greedy"),
        lambda: make_matcher("icfm", ot_pairing="greedy"),  # caught even where it is unused
        lambda: ot_pairing_indices(torch.zeros(2, 2), torch.zeros(2, 2), "greedy"),
    ):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert "'greedy'" in message
        assert all(mode in message for mode in OT_PAIRINGS)


def test_negative_sigma_rejected():
    with pytest.raises(ValueError, match="sigma"):
        make_matcher("icfm", sigma=-0.1)


def test_si_target_closed_form():
    # Spot-check si against hand-evaluated trigonometry at t = 1/3 (cos = sqrt(3)/2, sin = 1/2).
    x0, x1, eps = _tensors((4, 2), seed=9)
    s = make_matcher("si", sigma=0.0).path(1 / 3, x0, x1, eps)
    c, sn = math.sqrt(3) / 2, 0.5
    torch.testing.assert_close(s.xt, c * x0 + sn * x1, rtol=0, atol=1e-12)
    torch.testing.assert_close(s.ut, math.pi / 2 * (c * x1 - sn * x0), rtol=0, atol=1e-12)


def test_ot_blocks_pair_each_block_within_itself():
    """--ot_scope=local: with 2 blocks, each half is re-paired by its own optimal permutation (as
    two ranks of the published DDP script would), never across the halves."""
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g, dtype=torch.float64)
    sample = make_matcher("otcfm", ot_pairing="permutation", ot_blocks=2).sample(x0, x1)
    for half in (slice(0, 4), slice(4, 8)):
        rows, cols = linear_sum_assignment(torch.cdist(x0[half], x1[half]).square().numpy())
        expected = x0[half][rows[np.argsort(cols)]]  # the noise matched to each data row, in data order
        assert torch.equal(sample.x1[half], x1[half]) and torch.equal(sample.x0[half], expected)
    whole = make_matcher("otcfm", ot_pairing="permutation").sample(x0, x1)
    assert not torch.equal(whole.x0, sample.x0)  # one block over 8 pairs across the halves
    with pytest.raises(ValueError, match="does not split into 3 OT blocks"):
        make_matcher("otcfm", ot_blocks=3).sample(x0, x1)
