"""Guided FID, per-label FID and KID: the library pieces in this process (KID against a numpy MMD^2,
per-class FID against frechet_distance of the class's features, the cached reference features, the
--sweep guidance entry), and compute_fid.py on a tiny class-conditioned checkpoint in a subprocess
(a guidance sweep on the same noise and labels, its records, the refusals before sampling)."""

import numpy as np
import pytest
import torch
from conftest import TINY_UNET_CONFIG, save_tiny_checkpoint, stand_in_extractor, write_fake_cifar10
from test_compute_fid import OFFLINE, SAMPLING_STARTS, fid_files, run_cli, stand_in

from cfm.evaluation import feature_metrics, fid, results
from cfm.evaluation.solvers import split_guidance_sweep
from cfm.io.cifar10 import load_cifar10
from cfm.io.errors import UserError
from cfm.io.run_files import append_jsonl, read_jsonl
from cfm.method.guidance import Guidance, balanced_labels
from cfm.method.unet import UNetModel

pytestmark = pytest.mark.usefixtures("one_thread")


def numpy_kid(real, fake):
    """Unbiased MMD^2 (Binkowski et al. 2018) of equal-sized feature sets under k(x, y) = (x.y / D + 1)^3."""
    m, dim = len(real), real.shape[1]
    k_rr, k_ff, k_rf = ((a @ b.T / dim + 1) ** 3 for a, b in ((real, real), (fake, fake), (real, fake)))
    within = (k_rr.sum() - np.trace(k_rr) + k_ff.sum() - np.trace(k_ff)) / (m * (m - 1))
    return within - 2 * k_rf.sum() / m**2


def test_kid_is_the_unbiased_polynomial_mmd_and_leaves_the_global_rng_alone():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(20, 8)), rng.normal(0.5, 1.2, size=(20, 8))
    state = torch.get_rng_state()
    # One subset of all 20 rows: torchmetrics' random subset is a permutation, which MMD^2 ignores.
    kid = feature_metrics.kernel_inception_distance(real, fake, subsets=1, subset_size=1000)
    assert torch.equal(torch.get_rng_state(), state)
    assert kid.subset_size == 20 and kid.kid_std == 0
    assert kid.kid == pytest.approx(numpy_kid(real, fake), rel=1e-10) and kid.kid > 0.01
    # Subsets of 10 of 20: the seed picks them.
    draws = [feature_metrics.kernel_inception_distance(real, fake, 5, 10, seed=s) for s in (1, 1, 2)]
    assert draws[0] == draws[1] != draws[2] and draws[0].kid_std > 0


class CountingExtractor:
    """stand_in_extractor(4), counting the images it featurises."""

    def __init__(self):
        self.extract, self.images = stand_in_extractor(4), 0

    def __call__(self, images):
        self.images += len(images)
        return self.extract(images)


def test_reference_features_are_cached_and_per_class_fid_scores_each_class_against_its_own(tmp_path):
    write_fake_cifar10(tmp_path, per_batch=40)  # 200 train images, 20 of each class
    extractor = CountingExtractor()
    reference = feature_metrics.load_reference_features(extractor, tmp_path, "train", batch_size=64)
    images, labels = load_cifar10(tmp_path)
    assert reference.path == tmp_path / "fid" / "cifar10_legacy_tensorflow_train_32_features.npz"
    assert extractor.images == 200 and np.array_equal(reference.labels, labels.numpy())
    train_features = stand_in_extractor(4)(images).numpy().astype(np.float32)  # cached as float32
    assert np.array_equal(reference.features, train_features)
    again = feature_metrics.load_reference_features(extractor, tmp_path, "train")
    assert extractor.images == 200 and np.array_equal(again.features, reference.features)  # read, not extracted

    # Cluster labels of a 30-label net (3 per class) -> their classes; class 9 is not sampled.
    rng = np.random.default_rng(1)
    labels = torch.arange(60) % 27  # 6 or 7 samples of each class but 9
    classes = feature_metrics.sample_classes(labels, 30)
    assert np.array_equal(classes, labels.numpy() // 3)
    features = rng.normal(100, 30, size=(60, 4))
    scores = feature_metrics.per_class_fid(features, classes, reference)
    assert list(scores) == [str(c) for c in range(9)]
    for c in range(9):
        expected = fid.frechet_distance(*fid.feature_statistics(features[classes == c]),
                                        *fid.feature_statistics(train_features[reference.labels == c]))
        assert scores[str(c)] == pytest.approx(expected, rel=1e-9)
    assert len(set(scores.values())) == 9

    with pytest.raises(UserError, match="neither the 10 CIFAR-10 classes nor clusters"):
        feature_metrics.sample_classes(labels, 27)
    with pytest.raises(UserError, match="at least 2 samples of each class.*raise --num_gen"):
        feature_metrics.sample_classes(balanced_labels(15, 10), 10)


def test_the_sweep_guidance_entry_is_split_from_the_solver_entries():
    assert split_guidance_sweep("euler:100;guidance:0,1,2.5 ;dopri5:1e-5") == ("euler:100;dopri5:1e-5", [0, 1, 2.5])
    assert split_guidance_sweep("guidance:1,1.5") == ("", [1, 1.5])
    assert split_guidance_sweep("euler:1,2") == ("euler:1,2", None)
    for bad, message in [("guidance:1;guidance:2", "two guidance entries"), ("guidance:", "cannot read"),
                         ("euler:2;guidance:1,inf", "cannot read"), ("guidance:w", "cannot read")]:
        with pytest.raises(UserError, match=message):
            split_guidance_sweep(bad)


def conditional_checkpoint(path, num_classes=10):
    """A class-conditioned tiny UNet's checkpoint (EMA = raw), its zero-initialised layers randomised so
    that the labels reach the output. Returns (path, net)."""
    torch.manual_seed(0)
    net = UNetModel(**TINY_UNET_CONFIG, num_classes=num_classes).eval().requires_grad_(False)
    for p in net.parameters():
        if not p.any():
            p.copy_(0.05 * torch.randn(p.shape))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"net_model": net.state_dict(), "ema_model": net.state_dict(), "unet_config": net.config, "step": 7,
                "condition": {"condition": "class", "num_classes": num_classes, "cond_drop_prob": 0.1}}, path)
    return path, net


def test_a_guidance_sweep_scores_each_scale_on_the_same_noise_and_labels_with_kid_and_per_label_fid(tmp_path):
    path, net = conditional_checkpoint(tmp_path / "run" / "otcfm" / "otcfm_cifar10_weights_step_7.pt")
    data_dir = tmp_path / "data"
    write_fake_cifar10(data_dir)  # 100 train images, 10 of each class
    flags, scorer = fid_files(tmp_path, 2)  # 2 features: 3 samples of a class make a full-rank covariance
    proc = run_cli(tmp_path, [f"--checkpoint={path}", "--sweep=euler:2;guidance:0,1,2", "--num_gen=30",
                              "--batch_size_fid=8", "--kid", "--per_label_fid", f"--data_dir={data_dir}",
                              "--device=cpu", "--quiet", *flags], OFFLINE + stand_in(2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(path.parent / "fid.jsonl")
    assert [(r["condition"], r["guidance_scale"], r["label"]) for r in rows] == [("class", 0, None), ("class", 1, None),
                                                                                 ("class", 2, None)]
    assert [r["mean_nfe"] for r in rows] == [2, 2, 4]  # w = 2: both rows of each call counted

    labels = balanced_labels(30, 10)
    reference = feature_metrics.load_reference_features(None, data_dir)  # cached by the run: no extractor needed
    images, train_labels = load_cifar10(data_dir)
    train_features = stand_in_extractor(2)(images).numpy().astype(np.float32)
    unguided = scorer.evaluate_net(net, 30, 8, "euler", 2, progress=False)  # the null label's field
    for row, w in zip(rows, (0.0, 1.0, 2.0)):
        expected = scorer.evaluate_net(net, 30, 8, "euler", 2, guidance=Guidance(labels, w), progress=False)
        assert row["fid"] == pytest.approx(expected.fid, rel=1e-9)
        kid = feature_metrics.kernel_inception_distance(train_features, expected.features, seed=0)
        assert (row["kid"], row["kid_std"], row["kid_subset_size"]) == pytest.approx((kid.kid, kid.kid_std, 30), rel=1e-9)
        for c in range(10):
            mine = expected.features[labels.numpy() == c]
            ref = fid.feature_statistics(train_features[train_labels.numpy() == c])
            assert row["per_label_fid"][str(c)] == pytest.approx(
                fid.frechet_distance(*fid.feature_statistics(mine), *ref), rel=1e-9)
    assert rows[0]["fid"] == pytest.approx(unguided.fid, rel=1e-9)  # w = 0 on the same noise: the unguided samples
    assert len({r["fid"] for r in rows}) == 3 and len({r["kid"] for r in rows}) == 3  # the scale reaches the samples
    assert reference.path.is_file() and "KID " in proc.stdout and "guidance scale 2" in proc.stdout


@pytest.mark.parametrize("conditional, args, message", [
    (True, ["--label=10"], "--label=10 is not one of the checkpoint's 10 labels (0..9)."),
    (False, ["--sweep=guidance:1,2"], "--sweep's guidance entry needs a label-conditioned checkpoint (trained with "
                                      "--condition=class or cluster); this one is unconditional: drop it."),
], ids=["label out of range", "guidance sweep of an unconditional checkpoint"])
def test_guidance_the_checkpoint_cannot_take_is_one_sentence_before_sampling(tmp_path, conditional, args, message):
    path = tmp_path / "run" / "ckpt.pt"
    if conditional:
        conditional_checkpoint(path)
    else:
        save_tiny_checkpoint(path, 1)
    flags, _ = fid_files(tmp_path, 4)
    proc = run_cli(tmp_path, [f"--checkpoint={path}", "--num_gen=4", "--device=cpu", *args, *flags],
                   OFFLINE + stand_in(4) + SAMPLING_STARTS)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"compute_fid.py: {message}"], proc.stderr[-3000:]


def test_the_plots_keep_each_guidance_scale_of_a_sweep_apart(tmp_path):
    """plot_results: records of one solver setting at two scales are two evaluations, not one superseding the other."""
    for w, score in ((1.0, 9.0), (2.0, 7.0)):
        append_jsonl(tmp_path / "fid.jsonl", {"checkpoint": "c.pt", "use_ema": True, "fid_split": "train", "num_gen": 10,
                                              "integration_method": "euler", "integration_steps": 2, "mean_nfe": 2 * w,
                                              "fid": score, "condition": "class", "guidance_scale": w, "label": None})
    curves = results.fid_curves([tmp_path])
    assert [(c.run.split(", ")[-1], c.x, c.y) for c in curves] == [("w=1", [2.0], [9.0]), ("w=2", [4.0], [7.0])]
