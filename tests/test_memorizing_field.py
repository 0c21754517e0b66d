"""memorizing_field.py: v* against closed forms and Monte Carlo, chunking, ranks, the sampler, distances."""

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SUBPROCESS_TIMEOUT_S
from scipy.special import softmax

from cfm.evaluation import memorizing_field
from cfm.evaluation.sampling import noise
from cfm.method.flow_matching import ICFM, make_matcher

REPO = Path(__file__).resolve().parents[1]

# The coefficient table of the issue, by hand: (a, b, a', b', sigma of eps) for each matcher.
CLOSED_FORMS = {
    "icfm": lambda t, s: (t, 1 - t, 1 + 0 * t, -1 + 0 * t, s + 0 * t),
    "otcfm": lambda t, s: (t, 1 - t, 1 + 0 * t, -1 + 0 * t, s + 0 * t),
    "fm": lambda t, s: (t, 1 - (1 - s) * t, 1 + 0 * t, -(1 - s) + 0 * t, 0 * t),
    "si": lambda t, s: (torch.sin(math.pi * t / 2), torch.cos(math.pi * t / 2),
                        math.pi / 2 * torch.cos(math.pi * t / 2), -math.pi / 2 * torch.sin(math.pi * t / 2), s + 0 * t),
}
MATCHERS = [("icfm", 0.0), ("icfm", 0.3), ("otcfm", 0.1), ("fm", 0.0), ("fm", 0.2), ("si", 0.0), ("si", 0.3)]


class TinyNet(torch.nn.Module):
    """A stand-in for the UNet on [B, 3, 8, 8] images: v = conv(x) (1 + t)."""

    config = {"dim": (3, 8, 8)}

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, t, x):
        return self.conv(x) * (1 + torch.as_tensor(t).reshape(-1, 1, 1, 1))


@pytest.mark.parametrize("name, sigma", MATCHERS)
def test_coefficient_table_reproduces_each_matchers_path_and_the_closed_forms(name, sigma):
    """xt = a x1 + b x0 + sigma eps and ut = a' x1 + b' x0 on random inputs (so the path is linear
    and ut has no eps term), and the table is the issue's, written out by hand above."""
    matcher = make_matcher(name, sigma)
    g = torch.Generator().manual_seed(0)
    t = torch.rand(64, dtype=torch.float64, generator=g)
    x0, x1, eps = (torch.randn(64, 3, 4, 4, dtype=torch.float64, generator=g) for _ in range(3))
    coef = memorizing_field.path_coefficients(matcher, t)
    path = matcher.path(t, x0, x1, eps)
    col = lambda c: c[:, None, None, None]  # noqa: E731
    torch.testing.assert_close(path.xt, col(coef.a) * x1 + col(coef.b) * x0 + col(coef.sigma) * eps, rtol=0, atol=1e-14)
    torch.testing.assert_close(path.ut, col(coef.da) * x1 + col(coef.db) * x0 + col(coef.dsigma) * eps, rtol=0,
                               atol=1e-14)
    assert not coef.dsigma.any()  # no matcher here has a time-dependent sigma
    for value, expected in zip((coef.a, coef.b, coef.da, coef.db, coef.sigma), CLOSED_FORMS[name](t, sigma)):
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-14)
    assert memorizing_field.independent_coupling(matcher) == (name != "otcfm")
    described = memorizing_field.MemorizingField(x1, matcher).describe()
    assert described["vstar_is_minimizer"] == (name != "otcfm")
    assert described["vstar_model"] == ("icfm" if name == "otcfm" else name)  # otcfm's reference is icfm's field


# Two training images of 1 x 1 x 2 pixels; a flip swaps the two pixels, so 4 terms in all.
TWO_POINTS = torch.tensor([[[[1.0, -1.0]]], [[[0.5, 0.2]]]], dtype=torch.float64)


def hand_vstar(name, sigma, t, x):
    """The issue's closed forms, term by term over the 2 images and their mirrors: x [P, 2] -> [P, 2]."""
    ys = np.array([[1.0, -1.0], [-1.0, 1.0], [0.5, 0.2], [0.2, 0.5]])
    if name == "si":  # sigma = 0
        sin, cos = math.sin(math.pi * t / 2), math.cos(math.pi * t / 2)
        w = softmax(-((x[:, None] - sin * ys) ** 2).sum(-1) / (2 * cos**2), axis=1)
        return math.pi / 2 * (w @ ys - sin * x) / cos
    if name == "fm":  # b = 1 - (1 - sigma) t, no eps
        b = 1 - (1 - sigma) * t
        w = softmax(-((x[:, None] - t * ys) ** 2).sum(-1) / (2 * b**2), axis=1)
        return w @ ys - (1 - sigma) * (x - t * (w @ ys)) / b
    # icfm, sigma = 0
    w = softmax(-((x[:, None] - t * ys) ** 2).sum(-1) / (2 * (1 - t) ** 2), axis=1)
    return (w @ ys - x) / (1 - t)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.99])
@pytest.mark.parametrize("name, sigma", [("icfm", 0.0), ("fm", 0.0), ("fm", 0.1), ("si", 0.0)])
def test_vstar_equals_the_hand_computed_two_point_field(name, sigma, t):
    """Random points, points near each scaled image, and points on the diagonal (equidistant from an
    image and its mirror: a mixed softmax even at t = 0.99)."""
    rng = np.random.default_rng(0)
    a = math.sin(math.pi * t / 2) if name == "si" else t
    x = np.concatenate([rng.normal(size=(6, 2)), a * np.array([[1.0, -1.0], [0.2, 0.5]]) + 0.01,
                        [[0.0, 0.0], [0.3, 0.3], [-0.4, -0.4]]])
    field = memorizing_field.MemorizingField(TWO_POINTS, make_matcher(name, sigma), chunk_size=1)
    v = field(t, torch.from_numpy(x).reshape(-1, 1, 1, 2)).reshape(-1, 2).numpy()
    np.testing.assert_allclose(v, hand_vstar(name, sigma, t, x), rtol=1e-9, atol=1e-12)


class GrowingNoise(ICFM):
    """A path whose sigma depends on t: xt = t x1 + (1 - t) x0 + sigma t eps, so ut = x1 - x0 + sigma eps
    carries an eps term (no matcher of the library has one; v* must count it: c = b b' + sigma sigma')."""

    name = "growing_noise"

    def _xt_ut(self, t, x0, x1, eps):
        return t * x1 + (1 - t) * x0 + self.sigma * t * eps, x1 - x0 + self.sigma * eps


@pytest.mark.parametrize("name", ["icfm", "fm", "si", "growing_noise"])
def test_vstar_is_the_monte_carlo_conditional_mean_of_ut_on_a_1d_toy(name):
    """1-D data {-1, 0.3, 1.5} (a flip changes nothing), sigma = 0.5. Draws of (x0, x1, eps) through the
    matcher's own path give (xt, ut); in every bin of xt, the mean of ut - v*(xt) is within 5 standard
    errors of 0 (E[ut | xt] = v*(xt), so E[(ut - v*(xt)) 1{xt in bin}] = 0 exactly: no bin-width bias).
    growing_noise's sigma depends on t, so its ut has an eps term that v* must count."""
    matcher = GrowingNoise(0.5) if name == "growing_noise" else make_matcher(name, 0.5)
    data = torch.tensor([-1.0, 0.3, 1.5], dtype=torch.float64).reshape(3, 1, 1, 1)
    field = memorizing_field.MemorizingField(data, matcher)
    g = torch.Generator().manual_seed(1)
    n = 200_000
    for t in (0.3, 0.8):
        x1 = data[torch.randint(3, (n,), generator=g)]
        x0, eps = (torch.randn(n, 1, 1, 1, dtype=torch.float64, generator=g) for _ in range(2))
        sample = matcher.path(t, x0, x1, eps)
        residual = (sample.ut - field(t, sample.xt)).flatten().numpy()
        xt = sample.xt.flatten().numpy()
        bins = np.floor(xt / 0.1).astype(int)
        checked = 0
        for b in np.unique(bins):
            r = residual[bins == b]
            if len(r) >= 2000:
                checked += 1
                assert abs(r.mean()) < 5 * r.std() / math.sqrt(len(r)), (t, b * 0.1, r.mean())
        assert checked >= 15


def test_chunked_equals_unchunked_and_stays_finite_near_t_1():
    """23 images of 3 x 8 x 8 in chunks of 4 (the last one 3) against one chunk, at t up to 1 - 1e-6
    (naive softmax weights underflow to 0 / 0 there); float32 (TF32 off) close to float64."""
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(23, 3, 8, 8, generator=g) * 255).to(torch.uint8)
    matcher = make_matcher("icfm")
    chunked, whole = (memorizing_field.MemorizingField(images, matcher, chunk_size=size) for size in (4, 23))
    x = torch.cat([torch.randn(5, 3, 8, 8, generator=g), (images[:3].double() / 127.5 - 1) * 0.9])
    for t in (0.05, 0.5, 0.95, 1 - 1e-6):
        v = chunked(t, x)
        assert torch.isfinite(v).all()
        torch.testing.assert_close(v, whole(t, x), rtol=1e-12, atol=1e-12)
    single = memorizing_field.MemorizingField(images, matcher, chunk_size=4, dtype=torch.float32)
    torch.testing.assert_close(single(0.5, x).double(), whole(0.5, x), rtol=1e-4, atol=1e-4)


def test_vstar_is_undefined_only_at_t_1_without_sigma():
    images = torch.zeros(2, 1, 1, 2)
    with pytest.raises(ValueError, match="undefined at t = 1"):
        memorizing_field.MemorizingField(images, make_matcher("icfm"))(1.0, torch.ones(1, 1, 1, 2))
    assert torch.isfinite(memorizing_field.MemorizingField(images, make_matcher("icfm", 0.1))(1.0, torch.ones(1, 1, 1, 2))).all()
    with pytest.raises(ValueError, match="increase strictly"):
        memorizing_field.path_points(make_matcher("icfm"), images, (0.5, 0.2))


def nearest_two(samples, images):
    """Brute force: the memorization criterion's distances d_i = min(|x - y_i|, |x - flip y_i|),
    the two smallest per sample, and whether the nearest term is a mirror."""
    x = samples.double().flatten(1)
    plain = torch.cdist(x, images.double().flatten(1))
    mirror = torch.cdist(x, images.double().flip(-1).flatten(1))
    d = torch.minimum(plain, mirror)
    nearest = d.argmin(1)
    is_mirror = mirror.gather(1, nearest[:, None])[:, 0] < plain.gather(1, nearest[:, None])[:, 0]
    return d.sort(1).values[:, :2], is_mirror


@pytest.mark.parametrize("name, sigma", [("icfm", 0.0), ("si", 0.0), ("fm", 0.05)])
def test_vstar_sampler_lands_on_training_images_or_their_mirrors(name, sigma):
    """24 samples from 10 images, integrated to t = 1 - 1e-3: every one memorized (d1 < d2 / 3),
    within 3 s sqrt(D) of its nearest term (s = sqrt(b^2 + sigma^2) at 1 - 1e-3: the width of the
    path around an image there), some on mirrors and some on the images themselves."""
    images = torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    matcher = make_matcher(name, sigma)
    field = memorizing_field.MemorizingField(images, matcher, chunk_size=3)
    samples = memorizing_field.memorizing_samples(field, noise(24, (3, 8, 8), seed=0), delta=1e-3, steps=50)
    nearest, is_mirror = nearest_two(samples, images)
    d1, d2 = nearest.T
    assert (d1 < d2 / 3).all(), (d1 / d2).max()
    width = memorizing_field.path_coefficients(matcher, 1 - 1e-3).s2.sqrt().item() * math.sqrt(3 * 8 * 8)
    assert (d1 < 3 * width).all() and width < 0.1 * d2.min(), (d1.max(), width)
    assert 0 < is_mirror.sum() < len(samples)


def test_trajectory_points_are_the_solvers_states_at_the_times():
    """Times 0.1, 0.5, 0.8 with 10 Euler steps over [0, 1]: the states after steps 1, 5 and 8 of an
    Euler loop on t_i = i / 10, for a field that depends on t."""
    def field(t, x):
        return torch.cos(3 * t) * x + t

    x0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    points = memorizing_field.trajectory_points(field, x0, (0.1, 0.5, 0.8), steps=10)
    x, states = x0, []
    for i in range(8):
        x = x + 0.1 * field(torch.tensor(i / 10, dtype=torch.float64), x)
        states.append(x)
    torch.testing.assert_close(points, torch.stack([states[0], states[4], states[7]]), rtol=1e-12, atol=1e-12)


def test_model_trajectory_points_follow_the_net_from_the_fid_noise():
    net = TinyNet().eval()
    points = memorizing_field.model_trajectory_points(net, 5, (0.2, 0.7), batch_size=2, steps=10, seed=3)
    expected = memorizing_field.trajectory_points(net, noise(5, (3, 8, 8), seed=3), (0.2, 0.7), steps=10)
    torch.testing.assert_close(points, expected.detach(), rtol=1e-6, atol=1e-6)


def test_path_points_carry_the_held_out_images_with_one_noise_for_all_times():
    """icfm, sigma = 0: xt = t x1 + (1 - t) x0 with x1 the uint8 images in [-1, 1]: near t = 1 the
    points are the images, and (xt - t x1) / (1 - t) is the same x0 ~ N(0, I) at every time."""
    images = (torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    times = (0.1, 0.5, 1 - 1e-7)
    points = memorizing_field.path_points(make_matcher("icfm"), images, times, seed=4).double()
    x1 = images.double() / 127.5 - 1
    torch.testing.assert_close(points[-1], x1, rtol=0, atol=1e-5)
    x0 = [(p - t * x1) / (1 - t) for p, t in zip(points[:2], times)]
    torch.testing.assert_close(x0[0], x0[1], rtol=0, atol=1e-5)
    assert abs(x0[0].std().item() - 1) < 0.1


def test_a_net_equal_to_vstar_scores_zero_and_a_zero_net_scores_one():
    """On both point sets: the path from held-out images and the trajectories of the net itself."""
    g = torch.Generator().manual_seed(0)
    train = (torch.rand(9, 3, 8, 8, generator=g) * 255).to(torch.uint8)
    held_out = (torch.rand(4, 3, 8, 8, generator=g) * 255).to(torch.uint8)
    field = memorizing_field.MemorizingField(train, make_matcher("si", 0.1), chunk_size=4)
    times = (0.1, 0.5, 0.9)
    point_sets = {"test path": memorizing_field.path_points(field.matcher, held_out, times, seed=0),
                  "own trajectories": memorizing_field.trajectory_points(field, noise(4, (3, 8, 8)), times, steps=10).float()}
    for name, points in point_sets.items():
        same = memorizing_field.field_distance(field, field, points, times, batch_size=3)
        zero = memorizing_field.field_distance(lambda t, x: torch.zeros_like(x), field, points, times, batch_size=3)
        assert same.overall < 1e-12 and max(same.per_time) < 1e-12, name
        assert zero.overall == pytest.approx(1, rel=1e-12) and zero.per_time == pytest.approx([1] * 3, rel=1e-12)
        assert same.squared_error.shape == (3, 4)


WORLD_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    sys.path[:0] = [{repo!r}, {tests!r}]
    from cfm.evaluation import memorizing_field
    from cfm.evaluation.sampling import noise
    from cfm.io.distributed import init_world
    from cfm.method.flow_matching import make_matcher
    from test_memorizing_field import TinyNet

    world = init_world("cpu")
    g = torch.Generator().manual_seed(0)
    train = (torch.rand(11, 3, 8, 8, generator=g) * 255).to(torch.uint8)  # slices of 5 and 6 images
    held_out = (torch.rand(5, 3, 8, 8, generator=g) * 255).to(torch.uint8)
    net = TinyNet().eval()
    field = memorizing_field.MemorizingField(train, make_matcher("si", 0.1), world=world, chunk_size=4)
    times = (0.2, 0.6, 0.9)
    on_test = memorizing_field.field_distance(net, field, memorizing_field.path_points(field.matcher, held_out, times, seed=1), times, 3)
    trajectories = memorizing_field.model_trajectory_points(net, 5, times, batch_size=2, steps=10, seed=0, world=world)
    on_model = memorizing_field.field_distance(net, field, trajectories, times, batch_size=4)
    samples = memorizing_field.memorizing_samples(field, noise(4, (3, 8, 8)), steps=20)
    torch.save({{"test": on_test.squared_error, "test_norm": on_test.squared_norm, "model": on_model.squared_error,
                "trajectories": trajectories, "samples": samples, "held": len(field.images)}},
               sys.argv[1] + f".{{world.rank}}")
    if world.size > 1:
        dist.destroy_process_group()
""")


def test_two_gloo_processes_give_the_one_process_numbers(tmp_path):
    """Each of 2 ranks holds its slice of the 11 training images (5 and 6) and solves its trajectory
    batches (0 and 2, 1): v*, the distances, the trajectories and the sampler's output equal one
    process's, on both ranks."""
    script = tmp_path / "world.py"
    script.write_text(WORLD_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    for launcher, out in (([], "one"), (torchrun, "two")):
        proc = subprocess.run([sys.executable, *launcher, str(script), str(tmp_path / out)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = torch.load(tmp_path / "one.0")
    assert one.pop("held") == 11 and one["test"].abs().sum() > 0 and one["model"].abs().sum() > 0
    for rank, held in ((0, 5), (1, 6)):
        two = torch.load(tmp_path / f"two.{rank}")
        assert two.pop("held") == held
        for key, value in one.items():
            torch.testing.assert_close(two[key], value, rtol=1e-9, atol=1e-12, msg=f"{key} on rank {rank}")
