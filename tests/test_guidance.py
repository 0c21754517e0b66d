"""Classifier-free guidance: w = 0 is the null-label field and w = 1 the conditional field, exactly;
any other w is v_null + w (v_cond - v_null), its one 2B-row forward equal to two separate passes;
an unconditional checkpoint's net is refused, and its weights and keys are those of before."""

import pytest
import torch
from conftest import TINY_UNET_CONFIG

from cfm.method.guidance import GuidedField
from cfm.method.unet import UNetModel


def conditional_net(num_classes=3):
    torch.manual_seed(0)
    net = UNetModel(**TINY_UNET_CONFIG, num_classes=num_classes).eval().requires_grad_(False)
    for p in net.parameters():  # the zero-initialised layers too, or the labels would not reach the output
        if not p.any():
            p.copy_(0.05 * torch.randn(p.shape))
    return net


def test_scale_0_is_the_null_field_and_1_the_conditional_field_exactly():
    net = conditional_net()
    labels, x, t = torch.tensor([0, 2, 1, 0]), torch.randn(4, 3, 32, 32), torch.rand(4)
    assert torch.equal(GuidedField(net, labels, 0.0)(t, x), net(t, x, torch.full((4,), 3)))
    assert torch.equal(GuidedField(net, labels, 1.0)(t, x), net(t, x, labels))
    assert torch.equal(net(t, x), net(t, x, torch.full((4,), 3)))  # no labels: the null label
    assert GuidedField(net, labels, 0.0).evaluations_per_call == 1 == GuidedField(net, labels, 1.0).evaluations_per_call


@pytest.mark.parametrize("t", [0.4, torch.rand(4)], ids=["scalar t", "per-sample t"])
def test_other_scales_combine_one_batched_forward_equal_to_two_passes(t):
    net = conditional_net()
    labels, x = torch.tensor([0, 2, 1, 0]), torch.randn(4, 3, 32, 32)
    calls = []
    net.register_forward_hook(lambda module, args, output: calls.append(len(args[1])))
    guided = GuidedField(net, labels, 2.5)(t, x)
    assert calls == [8] and GuidedField(net, labels, 2.5).evaluations_per_call == 2
    conditional, unconditional = net(t, x, labels), net(t, x, torch.full((4,), 3))
    torch.testing.assert_close(guided, unconditional + 2.5 * (conditional - unconditional), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(conditional, unconditional)  # the labels matter, or this proves nothing


def test_an_unconditional_net_is_refused_and_keeps_its_keys():
    net = UNetModel(**TINY_UNET_CONFIG)
    with pytest.raises(ValueError, match="unconditional"):
        GuidedField(net, torch.zeros(2, dtype=torch.int64), 2.0)
    with pytest.raises(ValueError, match="call it without labels"):
        net(0.5, torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.int64))
    conditional = UNetModel(**TINY_UNET_CONFIG, num_classes=10)
    assert set(conditional.state_dict()) - set(net.state_dict()) == {"label_emb.weight"}
    assert "num_classes" not in net.config and conditional.config["num_classes"] == 10
    torch.manual_seed(0)
    before = UNetModel(**TINY_UNET_CONFIG).state_dict()
    torch.manual_seed(0)
    assert all(torch.equal(before[k], v) for k, v in UNetModel(**TINY_UNET_CONFIG, num_classes=None).state_dict().items())
