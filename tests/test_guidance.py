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
    # float64: a batch of 8 rows may take another float32 convolution path than one of 4 (round-off
    # near 1e-6, which w = 2.5 amplifies); in float64 the two agree to 1e-12.
    net = conditional_net().double()
    labels, x = torch.tensor([0, 2, 1, 0]), torch.randn(4, 3, 32, 32, dtype=torch.float64)
    calls = []
    net.register_forward_hook(lambda module, args, output: calls.append(len(args[1])))
    guided = GuidedField(net, labels, 2.5)(t, x)
    assert calls == [8] and GuidedField(net, labels, 2.5).evaluations_per_call == 2
    conditional, unconditional = net(t, x, labels), net(t, x, torch.full((4,), 3))
    torch.testing.assert_close(guided, unconditional + 2.5 * (conditional - unconditional), rtol=1e-12, atol=1e-12)
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


def test_balanced_labels_give_every_class_and_every_cluster_of_a_class_the_same_share():
    from cfm.method.guidance import balanced_labels

    assert balanced_labels(25, 10).tolist() == [i % 10 for i in range(25)]
    clusters = balanced_labels(60, 30)  # 3 clusters per class: cluster = class * 3 + sub
    assert torch.equal(clusters // 3, torch.arange(60) % 10)  # class-balanced
    assert torch.equal(torch.bincount(clusters, minlength=30), torch.full((30,), 2))  # each cluster twice
    assert torch.equal(balanced_labels(7, 30, label=4), torch.full((7,), 4))
    with pytest.raises(ValueError, match="not one of the net's labels 0..29"):
        balanced_labels(7, 30, label=30)


def test_guided_sampling_counts_both_rows_in_its_nfe_and_keys_labels_by_sample_index():
    from cfm.evaluation.sampling import generate_samples
    from cfm.method.guidance import Guidance, balanced_labels

    net = conditional_net()
    labels = balanced_labels(6, 3)
    guided, nfe = generate_samples(net, 6, 4, "euler", 3, guidance=Guidance(labels, 2.0))
    assert nfe == 6  # 3 Euler steps x 2 rows per call
    assert torch.equal(generate_samples(net, 6, 6, "euler", 3, guidance=Guidance(labels, 2.0))[0], guided)  # batch size
    conditional, nfe = generate_samples(net, 6, 4, "euler", 3, guidance=Guidance(labels, 1.0))
    assert nfe == 3 and not torch.equal(conditional, guided)
    unconditional = generate_samples(net, 6, 4, "euler", 3)[0]  # no guidance: the null label
    assert torch.equal(generate_samples(net, 6, 4, "euler", 3, guidance=Guidance(labels, 0.0))[0], unconditional)
    swapped = generate_samples(net, 6, 4, "euler", 3, guidance=Guidance(labels.flip(0), 1.0))[0]
    assert not torch.equal(swapped, conditional)  # the labels reach the samples


def test_label_classes_of_class_and_cluster_labels():
    from cfm.method.guidance import label_classes

    labels = torch.arange(250)
    assert torch.equal(label_classes(labels[:10], 10), labels[:10])
    assert torch.equal(label_classes(labels, 250), labels // 25)  # cluster class * 25 + sub
    with pytest.raises(ValueError, match="neither the 10 CIFAR-10 classes nor clusters"):
        label_classes(labels[:7], 7)


def test_cluster_labels_follow_the_training_mix_of_each_class_at_any_length():
    from cfm.method.guidance import balanced_labels

    # 3 clusters per class; class c's clusters hold (c + 1, 2, 0) x 100 training images: unequal, one empty
    counts = [n for c in range(10) for n in ((c + 1) * 100, 200, 0)]
    labels = balanced_labels(3000, 30, label_counts=counts)
    assert torch.equal(labels // 3, torch.arange(3000) % 10)  # still class-balanced
    got = torch.bincount(labels, minlength=30).double().reshape(10, 3) / 300
    expected = torch.tensor(counts, dtype=torch.float64).reshape(10, 3)
    expected = expected / expected.sum(1, keepdim=True)
    assert (got - expected).abs().max() < 0.02  # low-discrepancy: within a few samples of 300 per class
    assert got[:, 2].sum() == 0  # an empty cluster is never requested
    assert torch.equal(balanced_labels(1234, 30, label_counts=counts), labels[:1234])  # a function of the index
    assert not torch.equal(labels, balanced_labels(3000, 30))  # the counts matter: without, equal shares
    with pytest.raises(ValueError, match="29 label counts for a net of 30 labels"):
        balanced_labels(10, 30, label_counts=counts[:29])


def test_sampling_guidance_takes_the_label_mix_the_checkpoint_records():
    from cfm.config import GuidanceConfig
    from cfm.evaluation.checkpoints import sampling_guidance
    from cfm.method.guidance import balanced_labels

    net = conditional_net(num_classes=20)
    counts = [3, 1] * 10
    ckpt = {"condition": {"condition": "cluster", "num_classes": 20, "cond_drop_prob": 0.1, "label_counts": counts}}
    guidance = sampling_guidance(GuidanceConfig(guidance_scale=2.0), net, 200, ckpt)
    assert guidance.scale == 2.0 and torch.equal(guidance.labels, balanced_labels(200, 20, label_counts=counts))
    first, second = torch.bincount(guidance.labels, minlength=20)[:2].tolist()
    assert first + second == 20 and abs(first - 15) <= 1  # 3 : 1 within class 0's 20 samples, to one sample
    assert torch.equal(sampling_guidance(GuidanceConfig(), net, 200, {}).labels, balanced_labels(200, 20))
