"""The UNet: published checkpoint layout, reference outputs, time handling, config round trip."""

import copy
import inspect
import io
from pathlib import Path

import pytest
import torch
from torch import nn

from cfm.method.unet import PAPER_CONFIG, UNetModel, check_config, strip_state_dict_prefixes

DATA = Path(__file__).parent / "data"
TINY = dict(dim=(3, 16, 16), num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
            attention_resolutions="8", num_heads=2, num_head_channels=-1, dropout=0.0)


def shape_str(shape):
    return "x".join(str(s) for s in shape)


@pytest.fixture(scope="module")
def paper_shapes():
    """Published checkpoint layout: {key: "512x128", ...}, 304 tensors."""
    lines = (DATA / "cifar10_unet_state_dict.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["key", "shape"]
    return dict(line.split("\t") for line in lines[1:])


@pytest.fixture(scope="module")
def paper_net():
    """Paper-config UNet on the meta device: full architecture, no memory, no init cost."""
    with torch.device("meta"):
        return UNetModel(**PAPER_CONFIG)


@pytest.fixture(scope="module")
def fixture():
    return torch.load(DATA / "tiny_unet_fixture.pt", weights_only=True)


@pytest.fixture(scope="module")
def fixture_net(fixture):
    net = UNetModel(**fixture["config"])
    net.load_state_dict(fixture["state_dict"], strict=True)
    return net.eval()


def test_paper_config_matches_published_checkpoint(paper_net, paper_shapes):
    mine = {k: shape_str(v.shape) for k, v in paper_net.state_dict().items()}
    assert mine == paper_shapes
    # Same order too: a published optimizer state maps its entries to parameters by position.
    assert list(mine) == list(paper_shapes)
    assert sum(p.numel() for p in paper_net.parameters()) == 35_746_307
    # attention at 16x16 only (input_blocks 4, 5 and the mirrored decoder blocks) plus the middle
    assert paper_shapes["middle_block.1.qkv.weight"] == "768x256x1"
    assert paper_net.middle_block[1].num_heads == 4


def test_the_default_unet_is_the_paper_config():
    """Every argument of UNetModel has a default, and together they are PAPER_CONFIG (unconditional:
    num_classes None)."""
    defaults = {name: p.default for name, p in inspect.signature(UNetModel).parameters.items()}
    assert defaults == {**PAPER_CONFIG, "num_classes": None}


def test_paper_config_loads_published_layout_strictly(paper_net, paper_shapes):
    state_dict = {k: torch.empty([int(n) for n in v.split("x")], device="meta") for k, v in paper_shapes.items()}
    result = paper_net.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # a wrong shape must be refused, or the test above proves nothing about shapes
    state_dict["out.2.weight"] = torch.empty(3, 64, 3, 3, device="meta")
    with pytest.raises(RuntimeError, match="size mismatch"):
        paper_net.load_state_dict(state_dict, strict=True)


def test_reproduces_reference_outputs(fixture, fixture_net):
    x, t = fixture["x"], fixture["t"]
    with torch.no_grad():
        out = fixture_net(t, x)
        out_scalar = fixture_net(fixture["t_scalar"], x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, fixture["out"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out_scalar, fixture["out_scalar_t"], atol=1e-5, rtol=0)


def test_scalar_time_equals_broadcast_time(fixture, fixture_net):
    x = fixture["x"]
    with torch.no_grad():
        broadcast = fixture_net(torch.full((x.shape[0],), 0.3), x)
        assert torch.equal(fixture_net(torch.tensor(0.3), x), broadcast)
        assert torch.equal(fixture_net(0.3, x), broadcast)
        assert torch.equal(fixture_net(torch.tensor([0.3]), x), broadcast)
        # the time really enters: another t gives another output
        assert not torch.allclose(fixture_net(0.7, x), broadcast)


def test_samples_are_independent_in_a_batch(fixture, fixture_net):
    """GroupNorm and attention act per sample: one batched call == separate calls."""
    x, t = fixture["x"], fixture["t"]
    with torch.no_grad():
        batched = fixture_net(t, x)
        separate = torch.cat([fixture_net(t[i : i + 1], x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(batched, separate, atol=1e-5, rtol=1e-5)


def test_ode_solvers_can_call_it(fixture, fixture_net):
    """torchdyn calls f(t, x, args={}) with a 0-dim t; an Euler step is x + dt * f(t, x)."""
    from torchdyn.core import NeuralODE

    x = fixture["x"][:2]
    node = NeuralODE(fixture_net, solver="euler")
    with torch.no_grad():
        traj = node.trajectory(x, t_span=torch.tensor([0.0, 0.5]))
        expected = x + 0.5 * fixture_net(0.0, x)
    torch.testing.assert_close(traj[-1], expected, atol=1e-5, rtol=1e-5)


def test_attention_resolutions_forms():
    def layout(**kw):
        with torch.device("meta"):
            return {k: v.shape for k, v in UNetModel(**kw).state_dict().items()}

    as_string = layout(attention_resolutions="16,8")
    assert as_string == layout(attention_resolutions=[16, 8])
    assert as_string != layout(attention_resolutions="16")
    assert "input_blocks.7.1.qkv.weight" in as_string  # 8x8 level now has attention
    assert "input_blocks.7.1.qkv.weight" not in layout(attention_resolutions="16")


def test_config_rebuilds_and_survives_checkpoint_round_trip():
    net = UNetModel(**TINY)
    config = net.config
    assert config["channel_mult"] == [1, 2] and config["dim"] == [3, 16, 16]
    buffer = io.BytesIO()
    torch.save({"config": config, "net": net.state_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["config"] == config
    rebuilt = UNetModel(**loaded["config"])
    rebuilt.load_state_dict(loaded["net"], strict=True)
    assert rebuilt.config == config
    assert str(rebuilt) == str(net)


def test_paper_config_rebuilds_from_its_config(paper_net):
    with torch.device("meta"):
        rebuilt = UNetModel(**paper_net.config)
    assert rebuilt.config == paper_net.config
    assert str(rebuilt) == str(paper_net)


def test_fresh_model_outputs_zero():
    """ADM zero-initialises the last conv, so training starts from vt = 0."""
    net = UNetModel(**TINY)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(net(0.5, x), torch.zeros_like(x))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = UNetModel(**TINY)
    # Zero-initialised convs would block gradients to everything before them (and get zero
    # gradients themselves), so randomise every parameter to make "nonzero gradient" meaningful.
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    x = torch.randn(2, 3, 16, 16)
    net(torch.rand(2), x).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_bfloat16_tracks_float32(fixture, fixture_net):
    """bf16 autocast, and the whole net cast to bf16 (time embedding and GroupNorm statistics
    stay fp32 inside), both stay within a few percent of the fp32 reference output."""
    x, t, reference = fixture["x"], fixture["t"], fixture["out"]
    net_bf16 = copy.deepcopy(fixture_net).to(torch.bfloat16)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_out = fixture_net(t, x)
        cast_out = net_bf16(t, x.to(torch.bfloat16))
    assert cast_out.dtype == torch.bfloat16
    for out in (autocast_out, cast_out):
        assert (out.float() - reference).norm() / reference.norm() < 0.05


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_strip_state_dict_prefixes(prefix):
    state_dict = {"out.2.weight": torch.ones(1), "input_blocks.0.0.bias": torch.zeros(1)}
    prefixed = {prefix + k: v for k, v in state_dict.items()}
    stripped = strip_state_dict_prefixes(prefixed)
    assert list(stripped) == list(state_dict)
    assert all(stripped[k] is v for k, v in state_dict.items())
    assert list(prefixed) == [prefix + k for k in state_dict]  # input left untouched


def test_stripped_wrapped_state_dict_loads_strictly():
    net = UNetModel(**TINY)
    wrapped = nn.DataParallel(net)  # keys gain "module."
    assert next(iter(wrapped.state_dict())).startswith("module.")
    UNetModel(**TINY).load_state_dict(strip_state_dict_prefixes(wrapped.state_dict()), strict=True)


@pytest.mark.parametrize("change, expected", [
    (dict(attention_resolutions="7"), "attention_resolutions=7 asks for attention at 7x7"),  # not silently none
    (dict(attention_resolutions="8,4"), "attention_resolutions=8,4 asks for attention at 4x4, .* pick among 16,8"),
    (dict(channel_mult=(1,) * 6), "channel_mult=1,1,1,1,1,1 has 6 levels"),
    (dict(num_heads=3), "num_heads=3 does not split"),
    (dict(num_heads=48), "num_heads=48 does not split"),  # not silently 64 heads of 1 channel
    (dict(num_channels=48), "num_channels=48 is not a positive multiple of 32"),
    (dict(dropout=1.5), "dropout=1.5 is not a probability"),
])
def test_unet_refuses_a_config_it_would_build_wrongly(change, expected):
    with pytest.raises(ValueError, match=expected):
        UNetModel(**{**TINY, **change})
    with pytest.raises(ValueError, match=f"--{expected}"):  # callers name the arguments their way
        check_config({**TINY, **change}, names={k: f"--{k}" for k in TINY})
