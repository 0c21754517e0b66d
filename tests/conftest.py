"""Shared fixtures: a tiny CIFAR-10 written in the real on-disk format, tiny UNet settings."""

import os
import pickle

import numpy as np
import pytest
import torch

from cfm.config import UNetConfig
from cfm.io.cifar10 import CIFAR10_DIR, TEST_BATCHES, TRAIN_BATCHES
from cfm.method.unet import UNetModel

# Under pytest-xdist (make test) the workers share the cores: one thread each, and for the processes a
# test starts (they inherit the environment); N workers x N threads would oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# How long a test waits for a subprocess (a script, a torchrun job) or for its progress before it
# fails: the one setting every such wait scales from, generous so that a slow or busy machine makes
# the suite slower, not red. Raise it with the environment variable CFM_TEST_TIMEOUT_S (seconds).
SUBPROCESS_TIMEOUT_S = float(os.environ.get("CFM_TEST_TIMEOUT_S", 1800))
# Small enough for CPU tests, same family as the paper UNet.
TINY_UNET_FLAGS = ["--num_channel=32", "--num_res_blocks=1", "--channel_mult=1,2", "--num_head_channels=16"]
# The same network as a config (the flags' names) and as UNetModel arguments.
TINY_UNET_SETTINGS = UNetConfig(num_channel=32, num_res_blocks=1, channel_mult=(1, 2), num_head_channels=16)
TINY_UNET_CONFIG = dict(dim=(3, 32, 32), num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                        attention_resolutions="16", num_heads=4, num_head_channels=16, dropout=0.1)


def stand_in_extractor(num_features: int = 16):
    """A stand-in for Inception: images [B, 3, 32, 32] -> a fixed random projection [B, num_features] (float64)."""
    weight = torch.randn(3 * 32 * 32, num_features, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return lambda images: images.double().reshape(len(images), -1) @ weight


def random_unet(config, seed, all_zeroed=False):
    """UNetModel(**config) with seeded weights, its output layer randomised too: it starts at zero
    (v = 0), and a test net must move its inputs. `all_zeroed`: every zero-initialised weight
    randomised, the residual branches' last layers included: the time and label embeddings enter
    only there, so with them at zero a label (or t) changes nothing."""
    torch.manual_seed(seed)
    net = UNetModel(**config)
    torch.nn.init.normal_(net.out[-1].weight, std=0.05)
    if all_zeroed:
        with torch.no_grad():
            for weight in net.parameters():
                if weight.ndim > 1 and not weight.any():
                    torch.nn.init.normal_(weight, std=0.05)
    return net


def save_tiny_checkpoint(path, step, config=TINY_UNET_CONFIG, **extra):
    """A checkpoint of our format at `path`: raw and EMA weights of the tiny UNet (or of `config`, e.g.
    with num_classes: then with every zero-initialised weight randomised, so that labels matter) that
    differ, its config, `step` and any `extra` keys (e.g. flags, condition). Returns (path, net, ema)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conditional = config.get("num_classes") is not None
    net, ema = random_unet(config, 0, conditional), random_unet(config, 1, conditional)
    torch.save({"net_model": net.state_dict(), "ema_model": ema.state_dict(), "unet_config": ema.config,
                "step": step, **extra}, path)
    return path, net, ema


def write_fake_cifar10(root, per_batch: int = 20, seed: int = 0):
    """Write `{root}/cifar-10-batches-py/` with python-pickle batches shaped like CIFAR-10's.

    Each batch holds `per_batch` images (uint8 [n, 3072], channel-major) whose brightness depends on
    the label, so classes (and two sub-clusters per class) are easy to tell apart.
    Returns (train_images [N,3,32,32] uint8, train_labels [N]) as numpy arrays.
    """
    rng = np.random.default_rng(seed)
    folder = root / CIFAR10_DIR
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = [], []
    for name in TRAIN_BATCHES + TEST_BATCHES:
        labels = np.arange(per_batch) % 10
        level = 20 + 20 * labels + 10 * (np.arange(per_batch) // 10 % 2)
        images = np.clip(level[:, None] + rng.integers(0, 6, size=(per_batch, 3072)), 0, 255).astype(np.uint8)
        entry = {"batch_label": name, "labels": labels.tolist(), "data": images,
                 "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        if name in TRAIN_BATCHES:
            train_images.append(images.reshape(-1, 3, 32, 32))
            train_labels.append(labels)
    return np.concatenate(train_images), np.concatenate(train_labels)


@pytest.fixture(scope="session")
def fake_cifar(tmp_path_factory):
    """(data_dir, images, labels) of a 100-image fake CIFAR-10 train set (plus a test batch)."""
    root = tmp_path_factory.mktemp("cifar")
    images, labels = write_fake_cifar10(root)
    return root, images, labels


@pytest.fixture
def one_thread():
    """One intra-op thread: two spinning OpenMP threads on a busy 2-core machine are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def file_server(tmp_path):
    """(folder, base_url, requests): an HTTP server on 127.0.0.1 serving `folder`, logging each path
    requested. It runs in a daemon thread, is shut down after the test, and stops by itself after
    SUBPROCESS_TIMEOUT_S in any case."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "served"
    folder.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):  # quiet test output
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    deadline = threading.Timer(SUBPROCESS_TIMEOUT_S, server.shutdown)
    deadline.daemon = True
    deadline.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_port}", requests
    finally:
        deadline.cancel()
        server.shutdown()
        server.server_close()
