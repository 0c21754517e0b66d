"""The published import surface at the root (utils_cifar.py, samplers.py, unet/): each name does what
the published example's does, on the library's maths, and a script written the published way runs."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from conftest import SUBPROCESS_TIMEOUT_S

import samplers
import unet
import utils_cifar
from cfm.io.cifar10 import to_model_range
from cfm.method import samplers as cfm_samplers
from cfm.config.choices import PUBLISHED_CLUSTER_ALGORITHM, PUBLISHED_CLUSTER_SEED
from cfm.method.unet import PAPER_CONFIG, UNetModel, normalize_config
from unet.unet import UNetModelWrapper

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
# A save_image grid of 8 x 8 images of 32 pixels with 2-pixel padding: 8 * (32 + 2) + 2 pixels a side.
GRID_SIDE = 8 * 34 + 2


def grid_cells(path, nrow=8):
    """The decoded PNG at `path` as float [rows*nrow, 3, 32, 32] in [0, 1] (cells of a save_image grid)."""
    pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    rows = (pixels.shape[1] - 2) // 34
    return torch.stack([pixels[:, 2 + 34 * r: 34 * r + 34, 2 + 34 * c: 34 * c + 34]
                        for r in range(rows) for c in range(nrow)])


# ------------------------------------------------------------------------------------ utils_cifar


def test_ema_is_the_closed_form_over_parameters_and_buffers():
    def module(seed):
        torch.manual_seed(seed)
        m = nn.Linear(3, 2)
        m.register_buffer("running", torch.randn(4))
        m.register_buffer("count", torch.tensor(seed))
        return m

    source, target = module(0), module(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    utils_cifar.ema(source, target, 0.9)
    after = target.state_dict()
    for key in ("weight", "bias", "running"):
        torch.testing.assert_close(after[key], 0.9 * before[key] + 0.1 * source.state_dict()[key])
    assert after["count"] == 0  # an integer counter has no average: copied from source
    assert not torch.equal(after["weight"], before["weight"])


class LinearField(nn.Module):
    """v(t, x) = c x, recording every call's t and train/eval mode: Euler's x1 is x0 (1 + c h)^n."""

    def __init__(self, c):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(float(c)))
        self.calls = []

    def forward(self, t, x):
        self.calls.append((float(t), self.training))
        return self.c * x


def test_generate_samples_writes_the_published_grid_of_euler_samples(tmp_path):
    field = LinearField(0.5)
    torch.manual_seed(3)
    x0 = torch.randn(64, 3, 32, 32)  # what generate_samples draws after the same seed
    torch.manual_seed(3)
    field.eval()
    utils_cifar.generate_samples(field, False, f"{tmp_path}/run_", 7)  # savedir is concatenated
    path = tmp_path / "run_normal_generated_FM_images_step_7.png"
    assert Image.open(path).size == (GRID_SIDE, GRID_SIDE)
    # 99 Euler steps on linspace(0, 1, 100), in eval mode, then back in train mode
    assert [t for t, _ in field.calls] == pytest.approx(torch.linspace(0, 1, 100)[:-1].tolist())
    assert not any(training for _, training in field.calls) and field.training
    expected = (x0 * (1 + 0.5 / 99) ** 99).clip(-1, 1) / 2 + 0.5
    torch.testing.assert_close(grid_cells(path), expected, atol=0.6 / 255, rtol=0)


def test_generate_samples_unwraps_a_parallel_model(tmp_path):
    class Parallel(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args):
            raise AssertionError("the wrapper itself must not be sampled")

    wrapper = Parallel(LinearField(0.0)).eval()
    utils_cifar.generate_samples(wrapper, True, f"{tmp_path}/", 1, net_="ema")
    assert (tmp_path / "ema_generated_FM_images_step_1.png").is_file()
    assert len(wrapper.module.calls) == 99 and wrapper.training and wrapper.module.training


def test_infiniteloop_cycles_past_the_end_yielding_only_x():
    x, y = torch.arange(5.0), torch.arange(5) + 10
    loop = utils_cifar.infiniteloop(DataLoader(TensorDataset(x, y), batch_size=2))
    got = [next(loop).tolist() for _ in range(5)]
    assert got == [[0, 1], [2, 3], [4], [0, 1], [2, 3]]


def test_setup_joins_a_process_group(monkeypatch):
    import socket

    import torch.distributed as dist

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    utils_cifar.setup(0, 1, master_addr="127.0.0.1", master_port=str(port), backend="gloo")
    try:
        assert dist.get_world_size() == 1 and dist.get_rank() == 0 and dist.get_backend() == "gloo"
        assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("127.0.0.1", str(port))
    finally:
        dist.destroy_process_group()


class TanhField(nn.Module):
    """A per-sample nonlinear v(t, x) = tanh(a x + t)."""

    def forward(self, t, x):
        return torch.tanh(1.7 * x + t[:, None, None, None])


def test_compute_local_loss_is_the_published_formula():
    torch.manual_seed(0)
    x1, x0 = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    torch.manual_seed(1)
    loss = utils_cifar.compute_local_loss(TanhField(), x1, x0, sigma=0.3)
    torch.manual_seed(1)  # replay the draws: t, then the permutation, then eps
    t, perm = torch.rand(6), torch.randperm(6)
    eps = torch.randn_like(x1)
    u, s, tt = x1, x1[perm], t[:, None, None, None]
    u_t, s_t = tt * u + (1 - tt) * x0 + 0.3 * eps, tt * s + (1 - tt) * x0 + 0.3 * eps
    expected = torch.mean((TanhField()(t, u_t) - TanhField()(t, s_t) + s - u) ** 2)
    torch.testing.assert_close(loss, expected)
    assert loss > 0.01


def test_compute_local_loss_vanishes_for_the_conditional_target_field():
    """v(t, x) = (x - (1 - t) x0) / t maps every u_t back to u (sigma = 0): the loss is 0. The net
    sees the rows u_t then s_t in one call, so the field pairs row i and i + B with x0[i]."""
    torch.manual_seed(0)
    x1, x0 = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)

    def target_field(t, x):
        t = t[:, None, None, None]
        return (x - (1 - t) * torch.cat([x0, x0]).double()) / t

    assert utils_cifar.compute_local_loss(target_field, x1.double(), x0.double()) < 1e-20
    assert utils_cifar.compute_local_loss(lambda t, x: 0 * x, x1, x0) > 0.1  # v = 0: mean (s - u)^2


class TorchvisionLike(torch.utils.data.Dataset):
    """A CIFAR10 as torchvision holds it: ``.data`` uint8 [N, H, W, C], ``.targets`` a list; items in [-1, 1]."""

    def __init__(self, images, labels):
        self.data = images.transpose(0, 2, 3, 1).copy()
        self.targets = labels.tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return to_model_range(torch.from_numpy(self.data[i]).permute(2, 0, 1)), self.targets[i]


def test_visualize_clusters_writes_what_the_training_scripts_write(fake_cifar, tmp_path):
    _, images, labels = fake_cifar
    sampler = samplers.ClassConditionedSampler(TorchvisionLike(images, labels), 4, num_subclasses=2, verbose=False)
    utils_cifar.visualize_clusters(sampler, TorchvisionLike(images, labels), tmp_path / "mine")
    # what cfm/training/loop.py's cluster_sampler writes with --visualize
    theirs = cfm_training_sampler(images, labels, 2, tmp_path)
    cfm_samplers.save_cluster_grids(theirs.images, theirs.labels, theirs.assignment, 2, tmp_path / "theirs")
    files = sorted(p.name for p in (tmp_path / "theirs").iterdir())
    assert len(files) == 21 and "README.txt" in files  # 20 clusters + README
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == files
    for name in files:
        assert (tmp_path / "mine" / name).read_bytes() == (tmp_path / "theirs" / name).read_bytes(), name
    utils_cifar.visualize_clusters(sampler, TorchvisionLike(images, labels), tmp_path / "narrow", 3, grid_nrow=2)
    assert Image.open(tmp_path / "narrow" / files[-1]).size == (2 * 34 + 2, 2 * 34 + 2)  # 3 images, 2 a row


# ------------------------------------------------------------------------------------ samplers


def cfm_training_sampler(images, labels, num_subclasses, cache_dir):
    """The library sampler built the way cfm/training/loop.py's cluster_sampler builds it (defaults)."""
    sampler = cfm_samplers.ClassConditionedSampler(
        torch.from_numpy(images), torch.from_numpy(labels), 4, num_subclasses=num_subclasses, seed=0,
        cluster_weighting="uniform", cache_dir=cache_dir, cluster_seed=PUBLISHED_CLUSTER_SEED,
        algorithm=PUBLISHED_CLUSTER_ALGORITHM)
    sampler.labels = torch.from_numpy(labels)
    return sampler


@pytest.mark.parametrize("kind", ["torchvision", "minus_one_one", "zero_one"])
def test_sampler_clusters_are_the_training_scripts(fake_cifar, tmp_path, kind):
    _, images, labels = fake_cifar
    pixels = torch.from_numpy(images)
    dataset = {"torchvision": TorchvisionLike(images, labels),
               "minus_one_one": TensorDataset(to_model_range(pixels), torch.from_numpy(labels)),
               "zero_one": TensorDataset(pixels.float() / 255, torch.from_numpy(labels))}[kind]
    mine = samplers.ClassConditionedSampler(dataset, 4, num_subclasses=3, verbose=False)
    theirs = cfm_training_sampler(images, labels, 3, tmp_path)
    expected = {c: torch.nonzero(theirs.assignment == c).squeeze(1).tolist() for c in theirs.assignment.unique().tolist()}
    assert mine.class_to_indices == expected
    assert (mine.num_classes, mine.num_original_classes, mine.num_subclasses) == (30, 10, 3)
    assert sorted(i for members in mine.class_to_indices.values() for i in members) == list(range(len(labels)))


def test_sample_batch_from_class_draws_one_cluster_and_says_which(fake_cifar):
    _, images, labels = fake_cifar
    dataset = TorchvisionLike(images, labels)
    sampler = samplers.ClassConditionedSampler(dataset, 4, num_subclasses=2, verbose=False)
    items = torch.stack([dataset[i][0] for i in range(len(dataset))])

    def members(batch):  # dataset index of every row
        return [int(torch.nonzero((items == row).flatten(1).all(1))[0]) for row in batch]

    torch.manual_seed(0)
    batch, cluster = sampler.sample_batch_from_class(7)
    assert cluster == 7 and batch.shape == (4, 3, 32, 32)
    assert set(members(batch)) <= set(sampler.class_to_indices[7]) and len(set(members(batch))) == 4
    seen = set()
    for (batch, cluster), _ in zip(sampler, range(8)):
        assert set(members(batch)) <= set(sampler.class_to_indices[cluster])
        seen.add(cluster)
    assert len(seen) > 1  # a random cluster each time


def test_sampler_refuses_what_the_clustering_cannot_do(fake_cifar):
    _, images, labels = fake_cifar
    with pytest.raises(ValueError, match=r"^kmeans_max_iter=50 is not supported: [^.]*\.$"):
        samplers.ClassConditionedSampler(TorchvisionLike(images, labels), 4, kmeans_max_iter=50)
    with pytest.raises(ValueError, match=r"^num_classes=100 is not supported: [^.]*\.$"):
        samplers.ClassConditionedSampler(TorchvisionLike(images, labels), 4, num_classes=100)


# ------------------------------------------------------------------------------------ unet

PUBLISHED_TRAINING_UNET = dict(dim=(3, 32, 32), num_res_blocks=2, num_channels=128, channel_mult=[1, 2, 2, 2],
                               num_heads=4, num_head_channels=64, attention_resolutions="16", dropout=0.1)
TINY = dict(dim=(3, 32, 32), num_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions="16",
            num_heads=4, num_head_channels=16, dropout=0.1)


def test_the_published_training_unet_loads_the_published_weights_strictly():
    with torch.device("meta"):
        net = unet.UNetModelWrapper(**PUBLISHED_TRAINING_UNET)
    lines = (DATA / "cifar10_unet_state_dict.tsv").read_text().splitlines()[1:]
    reference = {k: [int(n) for n in shape.split("x")] for k, shape in (line.split("\t") for line in lines)}
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == reference
    state_dict = {k: torch.empty(shape, device="meta") for k, shape in reference.items()}
    net.load_state_dict(state_dict, strict=True)
    assert isinstance(net, UNetModel) and net.config == normalize_config(PAPER_CONFIG)


@pytest.mark.parametrize("config", [TINY, {**TINY, "num_heads": 2, "num_head_channels": -1}])
def test_the_wrapper_computes_what_unet_model_computes(config):
    torch.manual_seed(0)
    wrapper = unet.UNetModelWrapper(**config).eval()
    with torch.no_grad():  # the output and attention projections start at zero: make every layer count
        for p in wrapper.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = UNetModel(**config).eval()
    model.load_state_dict(wrapper.state_dict(), strict=True)
    t, x = torch.rand(2), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = wrapper(t, x, y=None)
        assert out.abs().max() > 0
        torch.testing.assert_close(out, model(t, x), rtol=0, atol=0)
    assert unet.UNetModel is UNetModel and UNetModelWrapper is unet.UNetModelWrapper


@pytest.mark.parametrize("size, mult", [(32, [1, 2, 2, 2]), (28, [1, 2, 2]), (64, [1, 2, 3, 4]),
                                        (128, [1, 1, 2, 3, 4]), (256, [1, 1, 2, 2, 4, 4])])
def test_channel_mult_none_picks_the_published_multipliers(size, mult):
    with torch.device("meta"):
        net = unet.UNetModelWrapper(dim=(3, size, size), num_channels=32, num_res_blocks=1,
                                    attention_resolutions=str(size // 2))
    assert net.config["channel_mult"] == mult


def test_the_working_published_options_build():
    with torch.device("meta"):
        for upsample in (-1, 4):
            unet.UNetModelWrapper(**TINY, num_heads_upsample=upsample)
        # with num_head_channels set, the published decoder ignores num_heads_upsample
        unet.UNetModelWrapper(**TINY, num_heads_upsample=3)
        unet.UNetModelWrapper(**{**TINY, "num_head_channels": -1, "num_heads": 2}, num_heads_upsample=2)


@pytest.mark.parametrize("option, value", [
    ("learn_sigma", True), ("use_checkpoint", True), ("use_scale_shift_norm", True),
    ("resblock_updown", True), ("use_fp16", True), ("use_new_attention_order", True)])
def test_each_unsupported_option_is_refused_in_one_sentence(option, value):
    with pytest.raises(ValueError, match=rf"^{option}=True is not supported: [^.]*\.$"):
        unet.UNetModelWrapper(**TINY, **{option: value})


def test_the_other_refusals_are_one_sentence_naming_the_option():
    with pytest.raises(ValueError, match=r"^num_heads_upsample=3 is not supported: [^.]*\.$"):
        unet.UNetModelWrapper(**{**TINY, "num_head_channels": -1, "num_heads": 2}, num_heads_upsample=3)
    with pytest.raises(ValueError, match=r"^channel_mult=None has no published default for 48-pixel images"):
        unet.UNetModelWrapper(dim=(3, 48, 48), num_channels=32, num_res_blocks=1)
    net = unet.UNetModelWrapper(**TINY)
    with pytest.raises(ValueError, match=r"^this UNet is unconditional \(num_classes=None\): call it without labels\.$"):
        net(torch.zeros(1), torch.zeros(1, 3, 32, 32), y=torch.zeros(1, dtype=torch.long))


def test_class_cond_builds_the_label_embedding_and_takes_labels():
    """class_cond=True, num_classes=10: label_emb has 11 rows (the last the null label), net(t, x, y)
    depends on y, and y=None is the null label."""
    torch.manual_seed(0)
    net = unet.UNetModelWrapper(**TINY, class_cond=True, num_classes=10).eval()
    assert net.label_emb.weight.shape == (11, 4 * TINY["num_channels"])
    t, x = torch.full((2,), 0.3), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for p in net.parameters():  # the zero-initialised layers too, or the labels would not reach the output
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape))
        by_label = [net(t, x, torch.tensor([k, k])) for k in (0, 1, 10)]
        assert not torch.equal(by_label[0], by_label[1])
        assert torch.equal(net(t, x), by_label[2])


# ------------------------------------------------------------------------------------ a published script

PUBLISHED_SCRIPT = '''
import copy, json
import torch
from torch.utils.data import DataLoader, TensorDataset
from samplers import ClassConditionedSampler
from unet import UNetModelWrapper
from utils_cifar import compute_local_loss, ema, generate_samples, infiniteloop

torch.manual_seed(0)
# 80 images: index i has class i % 10 and brightness level (i // 10) % 2, its sub-cluster.
labels = torch.arange(80) % 10
level = 20 + 20 * labels + 10 * (torch.arange(80) // 10 % 2)
images = (level[:, None, None, None] + torch.randint(0, 6, (80, 3, 32, 32))).float() / 127.5 - 1
dataset = TensorDataset(images, labels)
sampler = ClassConditionedSampler(dataset, batch_size=4, num_subclasses=2)
net_model = UNetModelWrapper(dim=(3, 32, 32), num_res_blocks=0, num_channels=32, channel_mult=[1, 1, 1, 1],
                             num_heads=1, attention_resolutions="4", dropout=0.1)
ema_model = copy.deepcopy(net_model)
optim = torch.optim.Adam(net_model.parameters(), lr=2e-4)
datalooper = infiniteloop(DataLoader(dataset, batch_size=4, shuffle=True, drop_last=True))
losses, clusters, members = [], [], []
for step, (xs, cluster) in zip(range(3), sampler):
    optim.zero_grad()
    x1 = next(datalooper)
    x0 = torch.randn_like(x1)
    t = torch.rand(x1.shape[0])
    xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
    loss_fm = torch.mean((net_model(t, xt) - (x1 - x0)) ** 2)
    loss = loss_fm + compute_local_loss(net_model, xs, torch.randn_like(xs))
    loss.backward()
    optim.step()
    ema(net_model, ema_model, 0.9)
    losses.append([loss_fm.item(), loss.item()])
    clusters.append(cluster)
    members.append([int(torch.nonzero((images == row).flatten(1).all(1))[0]) for row in xs])
ema_gap = max((a - b).abs().max().item() for a, b in zip(ema_model.parameters(), net_model.parameters()))
generate_samples(ema_model, False, "./", 3, net_="ema")
json.dump(dict(losses=losses, clusters=clusters, members=members, ema_gap=ema_gap), open("results.json", "w"))
'''


def test_a_script_written_the_published_way_trains_samples_and_draws_cluster_batches(tmp_path):
    (tmp_path / "train_published.py").write_text(textwrap.dedent(PUBLISHED_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "train_published.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["losses"]) == 3 and np.isfinite(results["losses"]).all()
    assert 0 < results["ema_gap"] < 1  # the EMA lags the trained net
    for cluster, members in zip(results["clusters"], results["members"]):
        # index i is class i % 10, sub-cluster (i // 10) % 2: one class and one brightness level per batch
        assert len({(i % 10, i // 10 % 2) for i in members}) == 1 and cluster // 2 == members[0] % 10
    assert len(set(results["clusters"])) > 1
    grid = Image.open(tmp_path / "ema_generated_FM_images_step_3.png")
    assert grid.format == "PNG" and grid.size == (GRID_SIDE, GRID_SIDE) and grid.mode == "RGB"
    pixels = np.array(grid)
    lines = pixels[[34 * k for k in range(9)] + [34 * k + 1 for k in range(9)]]
    assert (lines == 0).all()  # the padding between the 8 x 8 cells
    assert pixels.std() > 0
