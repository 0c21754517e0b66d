"""ODE sampling: solver orders and NFE on a linear ODE with a closed-form solution, seeding, grids, the
batch layout across ranks, straightness against closed forms, sweep specs, the progress bar."""

import math

import pytest
import torch
from conftest import TINY_UNET_CONFIG as TINY_CONFIG
from PIL import Image

from cfm.evaluation.sampling import (
    batch_ranges,
    generate_samples,
    interleave,
    noise,
    sample_batches,
    save_sample_grid,
    straightness,
)
from cfm.evaluation.solvers import SOLVERS, SolverSetting, integrate, parse_sweep
from cfm.io.cifar10 import to_uint8
from cfm.io.errors import UserError
from cfm.method.unet import UNetModel

# Many small solves: one intra-op thread is faster on a busy 2-core machine (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


# dx/dt = a x + t (elementwise, time-dependent so the stage times matter) has the solution
# x(t) = x0 e^{a t} + (e^{a t} - 1 - a t) / a^2.
A = torch.tensor([-1.5, -0.5, 0.7], dtype=torch.float64)
X0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def linear_field(t, x):
    return A * x + t


def exact_x1():
    e = torch.exp(A)
    return X0 * e + (e - 1 - A) / A**2


ORDERS = {"euler": (1, 1), "midpoint": (2, 2), "heun": (2, 2), "rk4": (4, 4)}  # (order, NFE per step)


@pytest.mark.parametrize("method", sorted(ORDERS))
def test_fixed_step_error_shrinks_at_the_solver_order_and_nfe_is_exact(method):
    order, nfe_per_step = ORDERS[method]
    steps = 8 if method == "rk4" else 32
    errors = []
    for n in (steps, 2 * steps):
        x1, nfe = integrate(linear_field, X0, method=method, steps=n)
        assert nfe == nfe_per_step * n
        errors.append((x1 - exact_x1()).abs().max().item())
    assert math.log2(errors[0] / errors[1]) == pytest.approx(order, abs=0.2)


@pytest.mark.parametrize(
    "method, expected",
    # One step h = 1 of dx/dt = x^2 + t from x0 = 1/2, by hand. On a linear field midpoint and Heun
    # coincide; this nonlinear one tells them (and any wrong stage time or weight) apart.
    [("euler", 0.75), ("midpoint", 1.390625), ("heun", 1.40625), ("rk4", 1109914571 / 536870912)],
)
def test_one_step_of_each_scheme_on_a_nonlinear_field(method, expected):
    x1, _ = integrate(lambda t, x: x * x + t, torch.tensor([0.5], dtype=torch.float64), method=method, steps=1)
    assert x1.item() == pytest.approx(expected, rel=1e-12)


def test_dopri5_meets_its_tolerance_and_tighter_tolerance_costs_more_evaluations():
    nfes = []
    for tol in (1e-4, 1e-7):
        x1, nfe = integrate(linear_field, X0, method="dopri5", tol=tol)
        assert (x1 - exact_x1()).abs().max().item() < 10 * tol
        nfes.append(nfe)
    assert 0 < nfes[0] < nfes[1]


def test_unknown_solver_is_one_sentence_listing_the_choices():
    with pytest.raises(ValueError, match="unknown ODE solver 'rk45': choose one of dopri5, euler, midpoint, heun, rk4"):
        integrate(linear_field, X0, method="rk45")
    assert SOLVERS == ("dopri5", "euler", "midpoint", "heun", "rk4")


def test_uint8_mapping_is_the_published_one():
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.5, 1.0, 3.0])
    # (x * 127.5 + 128) clipped to [0, 255], truncated: 0.5 -> 191.75 -> 191, -1 -> 0.5 -> 0.
    assert to_uint8(x).tolist() == [0, 0, 0, 128, 191, 255, 255]


class ConstantVelocity(torch.nn.Module):
    """v(t, x) = c: the flow moves every pixel by c, so x1 = x0 + c exactly with any solver."""

    def __init__(self, c, dim=(3, 4, 4)):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(float(c)))
        self.config = {"dim": list(dim)}

    def forward(self, t, x):
        return self.c.expand_as(x)


def test_generate_samples_maps_x0_plus_flow_to_uint8_nchw():
    net = ConstantVelocity(0.25)
    images, mean_nfe = generate_samples(net, num=5, batch_size=2, method="heun", steps=3, seed=7)
    assert images.dtype == torch.uint8 and images.shape == (5, 3, 4, 4)
    assert mean_nfe == 6
    assert torch.equal(images, to_uint8(noise(5, (3, 4, 4), seed=7) + 0.25))


def test_noise_is_keyed_by_sample_index_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    full = noise(6, (2, 3), seed=3)
    assert torch.equal(torch.cat([noise(range(4), (2, 3), seed=3), noise(range(4, 6), (2, 3), seed=3)]), full)
    assert torch.equal(noise([5, 1], (2, 3), seed=3), full[[5, 1]])  # any sample, without the ones before it
    assert not torch.equal(full, noise(6, (2, 3), seed=4))
    assert torch.equal(torch.get_rng_state(), state)
    # Standard normal (loose check over many draws).
    many = noise(64, (16,), seed=0)
    assert abs(many.mean().item()) < 0.1 and abs(many.std().item() - 1) < 0.1


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    net = UNetModel(**TINY_CONFIG)
    # The output layer is zero-initialised (v = 0, samples = noise); randomise it for real images.
    torch.nn.init.normal_(net.out[-1].weight, std=0.05)
    return net.train()


def test_unet_samples_are_deterministic_in_train_mode_and_independent_of_batching(tiny_net):
    a, nfe_a = generate_samples(tiny_net, num=4, batch_size=4, method="euler", steps=2, seed=1)
    b, _ = generate_samples(tiny_net, num=4, batch_size=3, method="euler", steps=2, seed=1)
    c, _ = generate_samples(tiny_net, num=4, batch_size=4, method="euler", steps=2, seed=2)
    assert nfe_a == 2
    # Dropout (p=0.1) would make repeated runs differ: sampling must run in eval mode.
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert tiny_net.training  # the caller's mode is restored


def test_dopri5_integrates_the_batch_as_one_system(tiny_net):
    batches = list(sample_batches(tiny_net, num=3, batch_size=3, method="dopri5", tol=1e-3, seed=0))
    assert len(batches) == 1
    x1, nfe = batches[0]
    assert x1.shape == (3, 3, 32, 32) and x1.dtype == torch.float32 and nfe > 0


def test_sample_grid_leaves_global_rng_and_mode_untouched(tiny_net, tmp_path):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    path = save_sample_grid(tiny_net, tmp_path / "grid.png", num=64, steps=1, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert tiny_net.training
    # 8 x 8 tiles of 32 px with torchvision's 2 px padding: 2 + 8 * 34 = 274.
    with Image.open(path) as image:
        assert image.size == (274, 274)


def test_sample_batches_restores_grad_and_train_mode_between_batches(tiny_net):
    seen = []
    for _ in sample_batches(tiny_net, num=2, batch_size=1, method="euler", steps=1):
        seen.append((torch.is_grad_enabled(), tiny_net.training))
    assert seen == [(True, True), (True, True)]


@pytest.mark.parametrize("num, batch_size, world_size", [(10, 3, 2), (9, 4, 2), (7, 2, 4), (4, 8, 3)])
def test_ranks_take_whole_batches_in_turn_and_interleave_restores_sample_order(num, batch_size, world_size):
    single = batch_ranges(num, batch_size)
    assert [i for r in single for i in r] == list(range(num))
    assert all(len(r) == batch_size for r in single[:-1])
    per_rank = [batch_ranges(num, batch_size, rank, world_size) for rank in range(world_size)]
    for rank, batches in enumerate(per_rank):  # batch k on rank k mod W, the same batch as in one process
        assert batches == [r for k, r in enumerate(single) if k % world_size == rank]
    assert interleave(per_rank) == single


class RotatingField(torch.nn.Module):
    """v(t, x) = omega J x, J rotating each pair of pixel values by 90 degrees: paths are circle arcs."""

    def __init__(self, omega, dim=(3, 4, 4)):
        super().__init__()
        self.omega = torch.nn.Parameter(torch.tensor(float(omega)))
        self.config = {"dim": list(dim)}

    def forward(self, t, x):
        pairs = x.reshape(len(x), -1, 2)
        return self.omega * torch.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(x.shape)


def test_straightness_is_zero_for_a_constant_field():
    assert straightness(ConstantVelocity(0.7), num=5, batch_size=2, steps=7, seed=1) == 0.0


def test_straightness_of_a_rotation_matches_the_closed_form():
    # Euler on v = omega J x multiplies each pixel pair (a complex number z) by (1 + i omega / N) per
    # step, so |v_i|^2 = omega^2 (1 + omega^2 / N^2)^i |z|^2 and x(1) - x(0) = ((1 + i omega / N)^N - 1) z:
    #   S_N = |x0|^2 (N ((1 + omega^2 / N^2)^N - 1) - |(1 + i omega / N)^N - 1|^2)
    # which tends to |x0|^2 (omega^2 - 2 + 2 cos omega), the straightness of the exact circular flow.
    omega, num, shape = 1.3, 6, (3, 4, 4)
    mean_sq_norm = noise(num, shape, seed=2).double().flatten(1).pow(2).sum(1).mean().item()

    def closed_form(n):
        return mean_sq_norm * (n * ((1 + omega**2 / n**2) ** n - 1) - abs((1 + 1j * omega / n) ** n - 1) ** 2)

    for steps in (1, 4, 50):
        value = straightness(RotatingField(omega, shape), num, batch_size=4, steps=steps, seed=2)
        assert value == pytest.approx(closed_form(steps), rel=1e-5)
    assert closed_form(50) > 0
    limit = mean_sq_norm * (omega**2 - 2 + 2 * math.cos(omega))
    assert straightness(RotatingField(omega, shape), num, batch_size=6, steps=2000, seed=2) == pytest.approx(limit, rel=2e-3)


def test_sweep_spec_is_read_in_order_and_mistakes_are_one_sentence():
    settings = parse_sweep("euler:1,2,5; midpoint:10 ;dopri5:1e-3,1e-5")
    assert settings == [SolverSetting("euler", steps=1), SolverSetting("euler", steps=2), SolverSetting("euler", steps=5),
                        SolverSetting("midpoint", steps=10), SolverSetting("dopri5", tol=1e-3),
                        SolverSetting("dopri5", tol=1e-5)]
    assert settings[0].describe() == {"integration_method": "euler", "integration_steps": 1}
    assert settings[-1].describe() == {"integration_method": "dopri5", "tol": 1e-5}
    for bad in ("rk45:10", "euler:1.5", "euler:0", "dopri5:-1e-3", "dopri5:nan", "euler", ";"):
        with pytest.raises(UserError) as err:
            parse_sweep(bad)
        assert "\n" not in str(err.value) and str(err.value).count(". ") == 0


def test_progress_bar_shows_images_per_second_and_mean_nfe_on_rank_0_only(capsys, monkeypatch):
    net = ConstantVelocity(0.1)
    generate_samples(net, num=5, batch_size=2, method="midpoint", steps=3, progress=True)
    bar = capsys.readouterr().err
    assert "sampling" in bar and "5/5" in bar and "img/s" in bar and "nfe=6.0" in bar
    generate_samples(net, num=5, batch_size=2, method="midpoint", steps=3, progress=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "1")  # another torchrun rank: silent even when asked for a bar
    generate_samples(net, num=5, batch_size=2, method="midpoint", steps=3, progress=True)
    assert capsys.readouterr().err == ""
