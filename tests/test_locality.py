"""Held-out locality (locality.py, compute_locality.py) on the fake CIFAR-10 and a tiny checkpoint:
the script's numbers against the published formulas written out here, paired draws across
checkpoints, a closed form, and bad input."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SUBPROCESS_TIMEOUT_S, save_tiny_checkpoint

from cfm.evaluation import locality
from cfm.io.run_files import read_jsonl
from cfm.method.flow_matching import make_matcher, pad_t_like_x
from cfm.method.samplers import ClassConditionedSampler

REPO = Path(__file__).resolve().parents[1]
# Two K-means clusters per class of the fake train split (10 images per class), batches of 4.
K, B = 2, 4

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(tmp_path, args):
    """compute_locality.py with `args`, one thread (see conftest.one_thread)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "compute_locality.py"), *args, "--device=cpu", "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """An icfm checkpoint trained with --sigma=0.1 (as its stored flags say): path and EMA net."""
    path, _, ema = save_tiny_checkpoint(tmp_path_factory.mktemp("runs") / "icfm" / "icfm_cifar10_weights_step_7.pt", 7,
                                        flags={"model": "icfm", "sigma": 0.1, "ot_pairing": "replacement"})
    return path, ema.eval()


@pytest.fixture(scope="module")
def train_split(fake_cifar):
    data_dir, images, labels = fake_cifar
    return torch.from_numpy(images), torch.from_numpy(labels)


def published_formulas(net, images, labels, seed, sigma, num_batches):
    """Per-batch local, anchor (full, simple) and icfm losses written out from the published
    formulas, each prediction its own net call, with the draws reproduced from `seed` in the order
    locality.HeldOutBatches documents: per batch x1 (sampler), x0, t, the icfm eps (path stream),
    local t', permutation, eps, then the anchor eps."""
    sampler = ClassConditionedSampler(images, labels, B, K, seed=seed, cluster_seed=42)
    g = torch.Generator().manual_seed(seed)
    g_path = torch.Generator().manual_seed(seed + locality.PATH_SEED_OFFSET)
    # Centroids: the mean of all members of the cluster and of their mirror images.
    pixels = images.double() / 127.5 - 1
    members = {int(c): pixels[sampler.assignment == c] for c in sampler.assignment.unique()}
    centroids = {c: torch.cat([m, m.flip(-1)]).mean(0) for c, m in members.items()}
    mse = lambda a: a.square().mean().item()  # noqa: E731
    out = {name: [] for name in locality.TERMS}
    for _ in range(num_batches):
        x1, cluster = sampler.next_batch()
        x0, t = torch.randn(x1.shape, generator=g), torch.rand(B, generator=g)
        eps_path = torch.randn(x1.shape, generator=g_path)
        t_local, perm = torch.rand(B, generator=g), torch.randperm(B, generator=g)
        eps_local = torch.randn(x1.shape, generator=g)
        eps_anchor = torch.randn(x1.shape, generator=g)
        T, T_local = pad_t_like_x(t, x1), pad_t_like_x(t_local, x1)
        u, s = x1, x1[perm]
        e = torch.stack([centroids[int(c)] for c in cluster]).float()
        xt = T * x1 + (1 - T) * x0 + sigma * eps_path
        out["loss_fm"].append(mse(net(t, xt) - (x1 - x0)))
        v_u = net(t_local, T_local * u + (1 - T_local) * x0 + sigma * eps_local)
        v_s = net(t_local, T_local * s + (1 - T_local) * x0 + sigma * eps_local)
        out["local_loss"].append(mse(v_u - v_s + s - u))
        v_x = net(t, T * x1 + (1 - T) * x0 + sigma * eps_anchor)
        v_e = net(t, T * e + (1 - T) * x0 + sigma * eps_anchor)
        out["anchor_loss_full"].append(mse(v_x - v_e + e - x1))
        out["anchor_loss_simple"].append(mse(v_x - v_e))
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in out.items()}


def test_the_script_reports_the_published_formulas_on_the_seeded_batches(tmp_path, fake_cifar, train_split, tiny_run):
    data_dir = fake_cifar[0]
    path, ema = tiny_run
    proc = run_cli(tmp_path, [f"--checkpoint={path}", f"--data_dir={data_dir}", "--split=train", "--num_batches=3",
                              f"--batch_size={B}", f"--num_subclasses={K}", "--seed=5"])
    assert proc.returncode == 0, proc.stderr
    record = read_jsonl(path.parent / "locality.jsonl")[-1]
    with torch.no_grad():
        expected = published_formulas(ema, *train_split, seed=5, sigma=0.1, num_batches=3)
    for name, values in expected.items():
        assert values.min() > 1e-6  # every term is a real test, not 0 = 0
        assert record[name] == pytest.approx(values.mean().item(), rel=1e-6), name
        assert record[f"{name}_se"] == pytest.approx(values.std().item() / math.sqrt(3), rel=1e-5), name
    assert {k: record[k] for k in ("checkpoint", "step", "model", "sigma", "use_ema", "split", "num_batches",
                                   "batch_size", "num_subclasses", "cluster_algorithm", "cluster_seed", "seed")} == {
        "checkpoint": str(path), "step": 7, "model": "icfm", "sigma": 0.1, "use_ema": True, "split": "train",
        "num_batches": 3, "batch_size": B, "num_subclasses": K, "cluster_algorithm": "minibatch", "cluster_seed": 42,
        "seed": 5}
    assert "git_commit" in record["provenance"] and not {"condition", "net_label"} & set(record)  # unconditional
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith(f"local_loss {record['local_loss']:.4g} ± ") and "(train split, num_batches 3, batch_size 4, seed 5" in line
    assert line.endswith(f"appended to {path.parent / 'locality.jsonl'}")


class Recorder(torch.nn.Module):
    """A stand-in net that keeps every input it is called with and returns `field(t, x)`."""

    def __init__(self, field):
        super().__init__()
        self.field, self.inputs = field, []

    def forward(self, t, x):
        self.inputs.append((t.clone(), x.clone()))
        return self.field(t, x)


def test_one_seed_gives_every_checkpoint_the_same_batches_and_another_seed_others(train_split, tiny_run):
    """An otcfm and an icfm checkpoint (other nets, other paths) see the same images, noise and
    times: the locality rows are identical, and so is the main rows' t. Seed 1 changes them."""
    _, ema = tiny_run

    def inputs(net, model, seed):
        recorder = Recorder(net)
        batches = locality.HeldOutBatches(*train_split, B, K, seed, make_matcher(model, 0.1))
        locality.evaluate(recorder, batches, num_batches=2)
        t = torch.stack([t for t, _ in recorder.inputs])
        x = torch.stack([x for _, x in recorder.inputs])
        return t, x

    t_ot, x_ot = inputs(ema, "otcfm", seed=0)
    t_i, x_i = inputs(lambda t, x: 2 * x, "icfm", seed=0)
    assert t_ot.shape == (2, 5 * B) and x_ot.shape == (2, 5 * B, 3, 32, 32)
    assert torch.equal(t_ot, t_i) and torch.equal(x_ot[:, B:], x_i[:, B:])
    assert not torch.equal(x_ot[:, :B], x_i[:, :B])  # only the path's own rows differ (OT re-pairs)
    t_other, x_other = inputs(lambda t, x: 2 * x, "otcfm", seed=1)
    assert not torch.equal(t_other, t_ot) and not torch.equal(x_other[:, B:], x_ot[:, B:])


def test_closed_form_for_v_equal_2x():
    """v(t, x) = 2x: v(u_t) - v(s_t) = 2t'(u - s) and v(x_t) - v(e_t) = 2t(x1 - e) whatever the noise,
    so local = mean((2t' - 1)^2 (u - s)^2), full = mean((2t - 1)^2 (x1 - e)^2), simple = mean(4t^2 (x1 - e)^2).
    Random images (one cluster per class, 6 images each), so that u - s and x1 - e are of order 1:
    the float32 differences of predictions then lose no more than ~1e-6 of the value."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(60) % 10

    def batches():
        return locality.HeldOutBatches(images, labels, B, 1, seed=3, matcher=make_matcher("icfm", 0.3))

    values = locality.evaluate(lambda t, x: 2 * x, batches(), num_batches=4)
    stream = batches()  # the same draws (see the test above)
    for i in range(4):
        batch = stream.next_batch()
        t, t_local = pad_t_like_x(batch.t[:B], batch.ut), pad_t_like_x(batch.t[B:2 * B], batch.ut)
        e, x1 = batch.anchor
        expected = {"local_loss": ((2 * t_local - 1) * batch.local).square().mean(),
                    "anchor_loss_full": ((2 * t - 1) * (x1 - e)).square().mean(),
                    "anchor_loss_simple": (2 * t * (x1 - e)).square().mean(),
                    "loss_fm": (2 * batch.x[:B] - batch.ut).square().mean()}
        for name, value in expected.items():
            assert value > 1e-2 and values[name][i].item() == pytest.approx(value.item(), rel=1e-6), name
    mean, error = locality.mean_and_error(values["local_loss"])
    assert mean == pytest.approx(values["local_loss"].mean().item())
    assert error == pytest.approx(values["local_loss"].std().item() / 2)
    assert math.isnan(locality.mean_and_error(values["local_loss"][:1])[1])


@pytest.mark.parametrize("args, message", [
    (["--num_batches=0"], "flag --num_batches=0: 0 is not a positive integer"),
    (["--model=nope", "BARE"], "unknown --model 'nope': choose one of otcfm, icfm, fm, si."),
])
def test_bad_input_is_one_sentence_before_any_work(tmp_path, tiny_run, args, message):
    path, ema = tiny_run
    bare = tmp_path / "bare.pt"  # a published-style checkpoint: no flags, so --model names the path
    torch.save({"ema_model": ema.state_dict(), "unet_config": ema.config}, bare)
    args = [f"--checkpoint={bare}" if a == "BARE" else a for a in args]
    proc = run_cli(tmp_path, [*args, f"--data_dir={tmp_path / 'no-data'}"])
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    if args[0] == "--num_batches=0":  # a flag's own bound: absl's parsing error, and its hint to --helpshort
        assert message in lines[0] and len(lines) == 2
    else:
        assert lines == [f"compute_locality.py: {message}"]
    assert not (tmp_path / "no-data").exists() and not (tmp_path / "locality.jsonl").exists()


def test_a_conditional_net_gets_each_batchs_class_or_the_null_label(train_split):
    """class_labels: the net is called as net(t, x, y) with y the batch's class on all 5B rows (a
    single-cluster batch is of one class); without it a conditional net's net(t, x) is its null-label field."""
    from conftest import TINY_UNET_CONFIG, random_unet

    net = random_unet({**TINY_UNET_CONFIG, "num_classes": 10}, 2, all_zeroed=True).eval()
    calls = []

    def labelled(t, x, y):
        calls.append(y.clone())
        return net(t, x, y)

    def batches():
        return locality.HeldOutBatches(*train_split, B, K, 0, make_matcher("icfm", 0.1))

    with_class = locality.evaluate(labelled, batches(), num_batches=2, class_labels=True)
    sampler = batches().sampler  # its own generator: the clusters of the batches above, in order
    assert len(calls) == 2
    for y in calls:
        _, cluster = sampler.next_batch()
        assert torch.equal(y, torch.full((5 * B,), int(cluster[0]) // K))
    null = locality.evaluate(lambda t, x: net(t, x, torch.full((len(x),), 10)), batches(), num_batches=2)
    assert all(torch.equal(a, b) for a, b in zip(locality.evaluate(net, batches(), 2).values(), null.values()))
    assert not torch.allclose(with_class["loss_fm"], null["loss_fm"])  # the label shows


def test_the_script_scores_a_class_conditioned_checkpoint_with_the_batch_classes(tmp_path, fake_cifar, train_split):
    from conftest import TINY_UNET_CONFIG

    path, _, ema = save_tiny_checkpoint(tmp_path / "icfm" / "icfm_cifar10_weights_step_5.pt", 5,
                                        config={**TINY_UNET_CONFIG, "num_classes": 10},
                                        flags={"model": "icfm", "sigma": 0.1, "ot_pairing": "replacement"},
                                        condition={"condition": "class", "num_classes": 10, "cond_drop_prob": 0.1})
    proc = run_cli(tmp_path, [f"--checkpoint={path}", f"--data_dir={fake_cifar[0]}", "--split=train",
                              "--num_batches=2", f"--batch_size={B}", f"--num_subclasses={K}"])
    assert proc.returncode == 0, proc.stderr
    record = read_jsonl(path.parent / "locality.jsonl")[-1]
    assert (record["condition"], record["net_label"]) == ("class", "class")
    batches = locality.HeldOutBatches(*train_split, B, K, 0, make_matcher("icfm", 0.1))
    expected = locality.evaluate(ema.eval(), batches, num_batches=2, class_labels=True)
    for name, values in expected.items():
        assert record[name] == pytest.approx(values.mean().item(), rel=1e-6), name
