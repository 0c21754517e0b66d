"""Class- and cluster-conditioned training (training/conditioning.py): every row of the forward gets
its own image's label, through otcfm's re-pairing with replacement, the regularizers' extra rows, the
pipelined OT, the monitor and resume; the checks and records around it.

The label-in-pixels tests train on a fake data set whose image i is constant, of brightness 50 + i,
so the image a row was built from can be read back from what the net and the loss see: the main
rows' x1 from (t, x_t, u_t) and the extra rows' image from (t, x, the regularizer's x0).
"""

import math
import pickle

import numpy as np
import pytest
import torch

from cfm.config import (
    AnchorConfig,
    ClusterConfig,
    ConditionConfig,
    ExecutionConfig,
    FlowConfig,
    LocalConfig,
    MonitorConfig,
    OptimConfig,
    PathsConfig,
    RunConfig,
    TrainConfig,
    flag_record,
)
from cfm.io import errors
from cfm.io.cifar10 import CIFAR10_DIR, TEST_BATCHES, TRAIN_BATCHES
from cfm.method.regularizers import AnchorRegularizer, LocalRegularizer
from conftest import TINY_UNET_SETTINGS

N = 100  # images; image i has brightness 50 + i and class i % 10


@pytest.fixture(scope="module")
def pixel_cifar(tmp_path_factory):
    """A CIFAR-10 folder whose image i is the constant 50 + i (labels i % 10)."""
    root = tmp_path_factory.mktemp("pixel_cifar")
    (root / CIFAR10_DIR).mkdir()
    per_batch = N // len(TRAIN_BATCHES)
    for b, name in enumerate(TRAIN_BATCHES + TEST_BATCHES):
        index = np.arange(per_batch) + b * per_batch if name in TRAIN_BATCHES else np.arange(per_batch)
        data = np.repeat((50 + index)[:, None], 3072, axis=1).astype(np.uint8)
        entry = {"batch_label": name, "labels": (index % 10).tolist(), "data": data,
                 "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}
        with open(root / CIFAR10_DIR / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    return root


def image_of(z):
    """The image index each row of z [R,3,32,32] (model range, constant images) shows."""
    return ((z.flatten(1).mean(1).double() + 1) * 127.5 - 50).round().long()


def main_x1(model, t, xt, ut):
    """x1 from a main row's t, x_t and u_t (sigma = 0): x_t + (1 - t) u_t on the straight lines;
    sin(a) x_t + cos(a) 2 / pi u_t on si's circle (a = pi t / 2)."""
    t = t.double()[:, None, None, None]
    if model == "si":
        a = t * math.pi / 2
        return torch.sin(a) * xt + torch.cos(a) * (2 / math.pi) * ut
    return xt + (1 - t) * ut


def config_of(data_dir, out, model="otcfm", condition="class", recipe=None, drop=0.0, steps=4, pipeline=True,
              **cluster):
    return TrainConfig(
        flow=FlowConfig(model=model), paths=PathsConfig(output_dir=str(out), data_dir=str(data_dir)),
        unet=TINY_UNET_SETTINGS, optim=OptimConfig(total_steps=steps, warmup=1, batch_size=4, seed=1),
        execution=ExecutionConfig(precision="fp32", ot_pipeline=pipeline),
        run=RunConfig(save_step=steps - 1, log_step=2, grid_size=4, grid_steps=2, wandb_mode="disabled", device="cpu"),
        cluster=ClusterConfig(num_subclasses=2, visualize=False, group_dir=str(out / "group"), **cluster),
        recipe=recipe or MonitorConfig(), condition=ConditionConfig(condition=condition, cond_drop_prob=drop))


def spy(monkeypatch):
    """Record, in order, each regularizer call (its x0 and outputs), each training step's inputs and
    each monitor forward."""
    from cfm.training import trainer

    events = []
    for cls in (LocalRegularizer, AnchorRegularizer):
        real = cls.extra_inputs

        def extra_inputs(self, x1, x0, cluster, sample, generator=None, real=real):
            out = real(self, x1, x0, cluster, sample, generator=generator)
            events.append(("extra", self, x0, sample, out))
            return out
        monkeypatch.setattr(cls, "extra_inputs", extra_inputs)
    real_losses = trainer.Trainer.losses
    monkeypatch.setattr(trainer.Trainer, "losses", lambda self, inputs: events.append(("step", inputs))
                        or real_losses(self, inputs))
    real_call = trainer.FastForward.__call__
    monkeypatch.setattr(trainer.FastForward, "__call__", lambda self, t, x, y=None: events.append(("forward", t, x, y))
                        or real_call(self, t, x, y))
    return events


def check_labels(events, model, label, batch=4, null=None):
    """Every row's label is its image's (or the null label, and then its partner's too)."""
    extra, checked = None, 0
    for event in events:
        if event[0] == "extra":
            extra = event
        elif event[0] == "forward" and extra is not None and extra[3] is None:  # the monitor's forward
            _, reg, x0, _, (t_extra, x_extra, _, _) = extra
            _, t, x, y = event
            z = (x - (1 - t[:, None, None, None]) * x0.repeat(2, 1, 1, 1)) / t[:, None, None, None]
            assert torch.equal(y, label[image_of(z)]), "the monitor's labels are not its images'"
            extra = None
        elif event[0] == "step":
            inputs = event[1]
            y, b = inputs.y, len(inputs.ut)
            expected = label[image_of(main_x1(model, inputs.t[:b], inputs.x[:b], inputs.ut))]
            if extra is not None:
                _, reg, x0, _, (t_extra, x_extra, _, _) = extra
                tt = t_extra[:, None, None, None]
                shown = label[image_of((x_extra - (1 - tt) * x0.repeat(len(t_extra) // batch, 1, 1, 1)) / tt)]
                if isinstance(reg, AnchorRegularizer):  # e_t rows are about the image of their partner row
                    partner = expected if reg.pairing == "main" else shown[:batch]
                    shown = partner if reg.pairing == "main" else torch.cat([shown[:batch], partner])
                expected = torch.cat([expected, shown])
                extra = None
            if null is None:
                assert torch.equal(y, expected), f"labels {y.tolist()} are not the images' {expected.tolist()}"
            else:
                dropped = y == null
                assert torch.equal(y[~dropped], expected[~dropped])
                assert torch.equal(dropped, dropped[:batch].repeat(len(y) // batch)), "a pair dropped apart"
            checked += 1
    assert checked >= 3


CASES = {  # id: (recipe, model, condition, pipelined OT, anchor pairing)
    "plain-otcfm-class-pipelined": (None, "otcfm", "class", True),
    "plain-otcfm-cluster-inline": (None, "otcfm", "cluster", False),
    "plain-icfm-class": (None, "icfm", "class", True),
    "plain-fm-cluster": (None, "fm", "cluster", True),
    "plain-si-class": (None, "si", "class", True),
    "locality-otcfm-cluster": (LocalConfig(), "otcfm", "cluster", True),
    "locality-icfm-class-inline": (LocalConfig(), "icfm", "class", False),
    "anchor-otcfm-class": (AnchorConfig(centroid_update_freq=2), "otcfm", "class", True),
    "anchor-main-otcfm-cluster": (AnchorConfig(anchor_pairing="main"), "otcfm", "cluster", False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_row_gets_its_own_images_label(case, pixel_cifar, tmp_path, monkeypatch, one_thread):
    from cfm.training import recipes

    recipe, model, condition, pipeline = CASES[case]
    events = spy(monkeypatch)
    recipes.train(config_of(pixel_cifar, tmp_path, model, condition, recipe, pipeline=pipeline))
    ckpt = torch.load(next((tmp_path).glob("*/*_step_3.pt")), weights_only=True)
    stream = ckpt["streams"]["batches"]
    if condition == "class":
        label = torch.arange(N) % 10
    else:
        label = stream["assignment"] if "assignment" in stream else stream["ids"]
    num_classes = 10 if condition == "class" else 20
    # label_counts: every training image's label counted, the mix evaluation samples labels in
    assert ckpt["condition"] == {"condition": condition, "num_classes": num_classes, "cond_drop_prob": 0.0,
                                 "label_counts": torch.bincount(label, minlength=num_classes).tolist()}
    assert ckpt["unet_config"]["num_classes"] == ckpt["condition"]["num_classes"]
    check_labels(events, model, label)


def test_dropped_labels_are_null_and_pairs_drop_together(pixel_cifar, tmp_path, monkeypatch, one_thread):
    from cfm.training import recipes

    events = spy(monkeypatch)
    recipes.train(config_of(pixel_cifar, tmp_path, "otcfm", "class", LocalConfig(), drop=0.5, steps=6))
    check_labels(events, "otcfm", torch.arange(N) % 10, null=10)
    labels = torch.cat([e[1].y for e in events if e[0] == "step"])
    assert 0 < (labels == 10).sum() < len(labels)


def test_an_unconditional_run_records_nothing_new():
    assert flag_record(TrainConfig()) == flag_record(TrainConfig(condition=ConditionConfig(cond_drop_prob=0.3)))
    assert "condition" not in flag_record(TrainConfig())
    record = flag_record(TrainConfig(condition=ConditionConfig(condition="cluster")))
    assert record["condition"] == "cluster" and record["cond_drop_prob"] == 0.1


def test_resume_across_condition_is_one_sentence(pixel_cifar, tmp_path, one_thread):
    from cfm.training import recipes

    recipes.train(config_of(pixel_cifar, tmp_path / "plain", "icfm", "none", steps=2))
    plain = next((tmp_path / "plain").glob("*/*_step_1.pt"))
    assert "condition" not in torch.load(plain, weights_only=True)
    recipes.train(config_of(pixel_cifar, tmp_path / "cond", "icfm", "class", steps=2))
    cond = next((tmp_path / "cond").glob("*/*_step_1.pt"))
    for path, condition, stored in ((plain, "class", "none"), (cond, "none", "class")):
        config = config_of(pixel_cifar, tmp_path / "again", "icfm", condition, steps=3)
        config = config.__class__(**{**config.__dict__, "run": RunConfig(checkpoint_path=str(path), device="cpu",
                                                                          wandb_mode="disabled", save_step=0)})
        with pytest.raises(errors.UserError, match=f"trained with --condition={stored} and this run asks for "
                                                   f"--condition={condition}: resume with --condition={stored}"):
            recipes.train(config)


@pytest.mark.parametrize("pairing", ["local", "published", "main"])
def test_extra_rows_of_a_mixed_batch_get_their_images_labels(pairing, monkeypatch, one_thread):
    """The training scripts' regularized batches hold one cluster (one label): here the batches mix
    labels, so a permuted row (local's s_t) or a re-paired one (anchor main's e_t) must find its own."""
    from cfm.io.cifar10 import ShuffledBatches
    from cfm.io.distributed import World
    from cfm.method import nets
    from cfm.method.flow_matching import make_matcher
    from cfm.training.conditioning import Conditioning
    from cfm.training.trainer import build_trainer

    images = (50 + torch.arange(N, dtype=torch.uint8))[:, None, None, None].expand(N, 3, 32, 32).contiguous()
    label = torch.arange(N) % 10
    if pairing == "local":
        reg = LocalRegularizer(weight=1.0)
    else:
        reg = AnchorRegularizer(1.0, 0.0, "full", images, label, 10, pairing=pairing)
    condition = Conditioning("class", 10, 0.0)
    unet = {**nets.unet_arguments(TINY_UNET_SETTINGS), "num_classes": 10}
    world = World(rank=0, size=1, device=torch.device("cpu"))
    trainer = build_trainer(OptimConfig(batch_size=8, seed=2, warmup=1), ExecutionConfig(precision="fp32"), unet,
                            world, make_matcher("otcfm"), ShuffledBatches(images, 8, seed=3, ids=label), reg,
                            condition=condition)
    events = spy(monkeypatch)
    for step in range(3):
        trainer.step(step)
        trainer.prefetch()
    check_labels(events, "otcfm", label, batch=8)


@pytest.mark.parametrize("script", ["train_cifar10_ddp.py", "train_cifar10_locality.py"])
def test_two_processes_train_what_one_process_trains_conditioned(script, fake_cifar, tmp_path):
    """Under torchrun (gloo) each rank's rows keep their labels and dropped labels: a conditioned
    run, with half the labels dropped, trains the same net on 1 and on 2 processes."""
    import test_scripts as scripts  # (a module object: its tests are not collected again here)

    data_dir, _, _ = fake_cifar
    published = {"train_cifar10_ddp.py": scripts.DDP_PUBLISHED,
                 "train_cifar10_locality.py": scripts.PUBLISHED["locality"][3].split()}[script]
    weights = []
    for procs in (1, 2):
        out = tmp_path / str(procs)
        scripts.train_on(procs, script, [*published, "--undefok=centroid_update_freq,centroid_samples"], out,
                         data_dir, "--total_steps=3", "--condition=class", "--cond_drop_prob=0.5")
        weights.append(torch.load(next(out.glob("*/*_step_2.pt")), weights_only=True))
    one, two = weights
    assert one["condition"] == two["condition"] == {"condition": "class", "num_classes": 10, "cond_drop_prob": 0.5,
                                                    "label_counts": [10] * 10}  # fake_cifar: 100 images, 10 a class
    assert one["flags"]["condition"] == "class" and one["flags"]["cond_drop_prob"] == 0.5
    assert scripts.relative_difference(one["net_model"], two["net_model"]) <= 1e-5
    assert "label_emb.weight" in one["net_model"]


@pytest.mark.parametrize("recipe", [None, LocalConfig()], ids=["plain-cluster", "locality-class"])
def test_a_conditioned_run_resumes_exactly(recipe, pixel_cifar, tmp_path, one_thread):
    """6 steps straight == 5 steps (a 'crash' after the step-4 save) + a resume from the step-3
    checkpoint, half the labels dropped: the drop coins, the labels stored with the shuffled stream and
    the clusters come back as they were. (Step 3 must not be a log step of the crashed run: the plain
    recipe's monitor, which runs on log steps, draws dropout masks.)"""
    import dataclasses

    from cfm.training import recipes

    condition = "cluster" if recipe is None else "class"

    def run(out, steps, resume_from=""):
        config = config_of(pixel_cifar, out, "otcfm", condition, recipe, drop=0.5, steps=steps)
        run_config = dataclasses.replace(config.run, save_step=3, checkpoint_path=resume_from)
        recipes.train(dataclasses.replace(config, run=run_config))
        return sorted(out.glob("*/*_step_*.pt"))

    full = run(tmp_path / "full", 6)
    part = run(tmp_path / "part", 5)
    resumed = run(tmp_path / "part", 6, str(next(p for p in part if p.name.endswith("_step_3.pt"))))
    a, b = (torch.load(paths[-1], weights_only=True) for paths in (full, resumed))
    assert a["step"] == b["step"] == 5
    for key in ("net_model", "ema_model"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), f"{key} differs after resume"
    # The step's `cluster` is logged for single-cluster batches (the locality recipe's) only: the plain
    # recipe's ids are per-image labels, not a batch's cluster.
    import json

    logged = [json.loads(line) for line in next((tmp_path / "full").glob("*/*metrics.jsonl")).read_text().splitlines()]
    logged = [record for record in logged if "loss" in record]
    assert logged and all(("cluster" in record) == (recipe is not None) for record in logged)
