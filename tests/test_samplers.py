"""K-means sub-cluster sampler: clusters, batch rules, determinism, resume, cache, grids."""

import io
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import adjusted_rand_score

from cfm.io.cifar10 import to_model_range
from cfm.method.clustering import CIFAR10_CLASSES, cluster_assignments
from cfm.method.samplers import ClassConditionedSampler, save_cluster_grids

PER_CLASS = 40


def make_data(per_class=PER_CLASS, seed=0):
    """10 classes x per_class uint8 images [N,3,32,32]: two brightness levels per class (60 and 190,
    +-20 noise), alternating, so every class has two obvious K-means clusters of per_class / 2.

    Returns images, labels [N], and the true sub-cluster (brightness level) [N].
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(per_class)
    level = torch.arange(len(labels)) % 2
    noise = torch.randint(-20, 21, (len(labels), 3, 32, 32), generator=g)
    images = (torch.where(level == 1, 190, 60)[:, None, None, None] + noise).to(torch.uint8)
    return images, labels, level


def true_assignment(labels, level, num_subclasses=2):
    return labels * num_subclasses + level


def image_table(images):
    """{float32 bytes of an image in [-1, 1]: (index, flipped)} for every image and its mirror
    (the synthetic images are all distinct and none is its own mirror)."""
    table = {}
    for flipped, view in ((False, images), (True, images.flip(-1))):
        for i, row in enumerate(to_model_range(view).flatten(1)):
            table[row.numpy().tobytes()] = (i, flipped)
    assert len(table) == 2 * len(images)
    return table


def identify(x1, table):
    """Index [B] of the source image of each x1 image and whether it was flipped [B] (bool);
    asserts that every x1 image is exactly a data image or its mirror."""
    found = [table.get(row.numpy().tobytes()) for row in x1.flatten(1)]
    assert None not in found, "a batch image is neither a data image nor its mirror"
    return torch.tensor([i for i, _ in found]), torch.tensor([f for _, f in found])


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def table(data):
    return image_table(data[0])


@pytest.fixture(scope="module")
def fitted(data):
    """K-means assignment of the synthetic data with 2 sub-clusters per class."""
    images, labels, _ = data
    return cluster_assignments(images, labels, num_subclasses=2, seed=0)


def test_kmeans_finds_the_obvious_clusters(data, fitted):
    images, labels, level = data
    assert fitted.dtype == torch.int64 and fitted.shape == labels.shape
    assert torch.equal(fitted // 2, labels)
    assert adjusted_rand_score(true_assignment(labels, level).numpy(), fitted.numpy()) == 1.0


def test_one_subclass_is_the_class_without_kmeans(data, monkeypatch):
    images, labels, _ = data
    monkeypatch.setattr("sklearn.cluster.KMeans", None)  # any K-means call would fail
    monkeypatch.setattr("sklearn.cluster.MiniBatchKMeans", None)
    assert torch.equal(cluster_assignments(images, labels, num_subclasses=1, seed=0), labels)


def test_same_seed_same_clusters(data, fitted):
    images, labels, _ = data
    assert torch.equal(cluster_assignments(images, labels, num_subclasses=2, seed=0), fitted)


@pytest.mark.parametrize("algorithm", ["minibatch", "lloyd"])
def test_clusters_are_scikit_learns_published_call(algorithm):
    """Each class's sub-clusters are those of scikit-learn's estimator called directly with the
    published parameters on that class's un-flipped pixels in [-1, 1] (here 3 clusters of 40 random
    images, so the estimator's own path decides them)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (400, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(400) % 10
    got = cluster_assignments(images, labels, num_subclasses=3, seed=42, algorithm=algorithm)
    for cls in range(10):
        points = (images[labels == cls].float() / 127.5 - 1).reshape(40, -1).numpy()
        if algorithm == "minibatch":
            kmeans = MiniBatchKMeans(n_clusters=3, max_iter=100, random_state=42, batch_size=min(1024, 40),
                                     n_init="auto")
        else:
            kmeans = KMeans(n_clusters=3, n_init=1, max_iter=100, random_state=42)
        expected = torch.from_numpy(kmeans.fit_predict(points)).long() + 3 * cls
        assert torch.equal(got[labels == cls], expected), cls
    with pytest.raises(ValueError, match="unknown clustering algorithm 'x'"):
        cluster_assignments(images, labels, num_subclasses=3, seed=42, algorithm="x")


def test_every_batch_is_one_cluster(data, table, fitted):
    images, labels, _ = data
    sampler = ClassConditionedSampler(images, labels, batch_size=8, num_subclasses=2, assignment=fitted)
    assert sampler.num_clusters == 20 and torch.equal(sampler.assignment, fitted) and sampler.images is images
    seen = set()
    for _ in range(30):
        x1, ids = sampler.next_batch()
        assert x1.shape == (8, 3, 32, 32) and x1.dtype == torch.float32
        assert ids.shape == (8,) and ids.dtype == torch.int64
        assert (ids == ids[0]).all()
        index, _ = identify(x1, table)
        assert (fitted[index] == ids).all()
        assert len(set(index.tolist())) == 8  # cluster of 20 >= batch: no repeats within a batch
        seen.add(int(ids[0]))
    assert len(seen) > 10  # uniform over 20 clusters: 30 draws visit many of them


def test_one_pass_uses_each_member_once(data, table):
    """K=1: clusters are the classes (40 images); batches of 8 -> a pass is 5 batches."""
    images, labels, _ = data
    sampler = ClassConditionedSampler(images, labels, batch_size=8, num_subclasses=1, seed=3)
    per_cluster = {}
    for _ in range(150):
        x1, ids = sampler.next_batch()
        per_cluster.setdefault(int(ids[0]), []).append(identify(x1, table)[0])
    counted = 0
    for cluster, batches in per_cluster.items():
        members = set(torch.nonzero(labels == cluster).squeeze(1).tolist())
        for p in range(len(batches) // 5):  # every complete pass
            drawn = torch.cat(batches[5 * p : 5 * p + 5]).tolist()
            assert sorted(drawn) == sorted(members)
            counted += 1
    assert counted >= 10


def test_pass_remainder_is_dropped(data, table):
    """Cluster of 40, batch 16: a pass gives 2 batches (32 distinct images), then a new pass."""
    images, labels, _ = data
    sampler = ClassConditionedSampler(images, labels, batch_size=16, num_subclasses=1, seed=1)
    per_cluster = {}
    for _ in range(60):
        x1, ids = sampler.next_batch()
        per_cluster.setdefault(int(ids[0]), []).append(identify(x1, table)[0])
    for batches in per_cluster.values():
        for p in range(len(batches) // 2):
            assert len(set(torch.cat(batches[2 * p : 2 * p + 2]).tolist())) == 32


def test_cluster_smaller_than_batch_is_filled_evenly(data, table, fitted):
    """Clusters of 20, batch 48 = 2 * 20 + 8: every member 2 or 3 times (8 of them 3 times)."""
    images, labels, _ = data
    sampler = ClassConditionedSampler(images, labels, batch_size=48, num_subclasses=2, assignment=fitted)
    for _ in range(40):  # clusters recur: each batch of a small cluster is a fresh fill
        x1, ids = sampler.next_batch()
        assert x1.shape[0] == 48 and (ids == ids[0]).all()
        index, _ = identify(x1, table)
        counts = Counter(index.tolist())
        members = torch.nonzero(fitted == ids[0]).squeeze(1).tolist()
        assert sorted(counts) == sorted(members)
        assert sorted(Counter(counts.values()).items()) == [(2, 12), (3, 8)]


def test_x1_range_and_flip(data, table, fitted):
    images, labels, _ = data
    sampler = ClassConditionedSampler(images, labels, batch_size=10, num_subclasses=2, assignment=fitted)
    flips = []
    for _ in range(40):
        x1, _ = sampler.next_batch()
        assert x1.min() >= -1 and x1.max() <= 1
        flips.append(identify(x1, table)[1])  # asserts each image is the original or its mirror
    flips = torch.cat(flips)
    # Binomial(400, 1/2): mean 200, sd 10.
    assert 150 <= int(flips.sum()) <= 250


def batches(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def assert_same_stream(a, b):
    for (xa, ia), (xb, ib) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ia, ib)


def test_same_seed_same_stream_other_seed_other_stream(data, fitted):
    images, labels, _ = data
    make = lambda seed: ClassConditionedSampler(  # noqa: E731
        images, labels, batch_size=8, num_subclasses=2, seed=seed, assignment=fitted
    )
    assert_same_stream(batches(make(5), 25), batches(make(5), 25))
    ids5 = [int(i[0]) for _, i in batches(make(5), 25)]
    ids6 = [int(i[0]) for _, i in batches(make(6), 25)]
    assert ids5 != ids6


def test_state_dict_round_trip_continues_exactly(data, fitted):
    images, labels, _ = data
    kwargs = dict(batch_size=12, num_subclasses=2, seed=2, cluster_weighting="size")
    sampler = ClassConditionedSampler(images, labels, assignment=fitted, **kwargs)
    batches(sampler, 17)
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    expected = batches(sampler, 40)

    resumed = ClassConditionedSampler(images, labels, assignment=state["assignment"], **kwargs)
    resumed.load_state_dict(state)
    assert_same_stream(batches(resumed, 40), expected)

    other_batch = ClassConditionedSampler(images, labels, assignment=fitted, **{**kwargs, "batch_size": 6})
    with pytest.raises(ValueError, match="batch_size"):
        other_batch.load_state_dict(state)
    shuffled = fitted.clone()
    shuffled[[0, 1]] = shuffled[[1, 0]]  # images 0 and 1: class 0, other sub-clusters
    with pytest.raises(ValueError, match="assignment"):
        ClassConditionedSampler(images, labels, assignment=shuffled, **kwargs).load_state_dict(state)


def test_size_weighting_follows_cluster_sizes():
    """K=1 with class 0 holding 310 of 400 images: 'size' draws it 77.5% of the time, 'uniform' 10%."""
    labels = torch.cat([torch.zeros(310, dtype=torch.int64), torch.arange(1, 10).repeat_interleave(10)])
    images = torch.randint(0, 256, (400, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    draws = 2000
    for weighting, p in (("size", 310 / 400), ("uniform", 0.1)):
        sampler = ClassConditionedSampler(images, labels, batch_size=1, num_subclasses=1, cluster_weighting=weighting)
        hits = sum(int(sampler.next_batch()[1][0]) == 0 for _ in range(draws))
        sd = (draws * p * (1 - p)) ** 0.5
        assert abs(hits - draws * p) < 5 * sd


def test_small_class_warns_and_leaves_ids_empty():
    """Class 3 has a single image, class 7 none, with 2 sub-clusters per class."""
    images, labels, _ = make_data(per_class=4)
    keep = (labels != 7) & ~((labels == 3) & (torch.arange(len(labels)) % 4 != 0))
    images, labels = images[keep], labels[keep]
    with pytest.warns(UserWarning) as record:
        assignment = cluster_assignments(images, labels, num_subclasses=2, seed=0)
    messages = " ".join(str(w.message) for w in record)
    assert "class 3 (cat) has 1 images" in messages and "class 7 (horse) has 0 images" in messages
    assert int(assignment[labels == 3]) == 6
    sampler = ClassConditionedSampler(images, labels, batch_size=4, num_subclasses=2, assignment=assignment)
    assert sampler.cluster_sizes[[7, 14, 15]].tolist() == [0, 0, 0]
    drawn = {int(sampler.next_batch()[1][0]) for _ in range(200)}
    assert drawn == set(range(20)) - {7, 14, 15}


def test_cache_written_reused_and_keyed(data, tmp_path, monkeypatch):
    images, labels, _ = data
    first = cluster_assignments(images, labels, num_subclasses=2, seed=0, cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1 and files[0].startswith("kmeans_") and "_k2_seed0_minibatch_" in files[0]
    cluster_assignments(images, labels, num_subclasses=4, seed=0, cache_dir=tmp_path)
    cluster_assignments(images, labels, num_subclasses=2, seed=1, cache_dir=tmp_path)
    cluster_assignments(images, labels, num_subclasses=2, seed=0, cache_dir=tmp_path, algorithm="lloyd")
    altered = images.clone()
    altered[0, 0, 0, 0] ^= 1
    cluster_assignments(altered, labels, num_subclasses=2, seed=0, cache_dir=tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert len(names) == 5 and not any(n.endswith(".tmp") for n in names)

    class NoKMeans:
        def __init__(self, *args, **kwargs):
            raise AssertionError("K-means ran although the cache holds the assignment")

    monkeypatch.setattr("sklearn.cluster.KMeans", NoKMeans)
    monkeypatch.setattr("sklearn.cluster.MiniBatchKMeans", NoKMeans)
    assert torch.equal(cluster_assignments(images, labels, num_subclasses=2, seed=0, cache_dir=tmp_path), first)
    sampler = ClassConditionedSampler(images, labels, batch_size=4, num_subclasses=2, cache_dir=tmp_path)
    assert torch.equal(sampler.assignment, first)


def test_unusable_cache_is_recomputed(data, fitted, tmp_path):
    images, labels, _ = data
    cluster_assignments(images, labels, num_subclasses=2, seed=0, cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unusable cluster cache"):
        again = cluster_assignments(images, labels, num_subclasses=2, seed=0, cache_dir=tmp_path)
    assert torch.equal(again, fitted)
    assert torch.equal(torch.load(path, weights_only=True), fitted)


def test_stored_assignment_is_validated(data, fitted):
    images, labels, _ = data
    make = lambda a, k=2: ClassConditionedSampler(images, labels, 4, num_subclasses=k, assignment=a)  # noqa: E731
    with pytest.raises(ValueError, match="400 images"):
        make(fitted[:-1])
    with pytest.raises(ValueError, match="must lie in"):
        make(torch.full_like(fitted, 20))
    with pytest.raises(ValueError, match="does not match the labels"):
        make(fitted, k=3)  # ids of K=2 read with K=3
    with pytest.raises(ValueError, match="integer"):
        make(fitted.float())


def test_cluster_grids_and_readme(data, fitted, tmp_path):
    images, labels, _ = data
    save_cluster_grids(images, labels, fitted, num_subclasses=2, out_dir=tmp_path / "group")
    pngs = sorted(p.name for p in (tmp_path / "group").glob("*.png"))
    assert pngs == [f"class_{c * 2 + s:03d}_orig_{c}_sub_{s:02d}.png" for c in range(10) for s in range(2)]
    # 20 members, 8 per row, 2 px padding: 8 x 3 cells of 34 px + 2.
    grid = Image.open(tmp_path / "group" / pngs[5])
    assert grid.size == (8 * 34 + 2, 3 * 34 + 2)
    first = int(torch.nonzero(fitted == 5)[0])  # members in index order: the first fills the first cell
    assert np.array_equal(np.asarray(grid.convert("RGB"))[2:34, 2:34], images[first].permute(1, 2, 0).numpy())
    readme = (tmp_path / "group" / "README.txt").read_text()
    assert readme.startswith("20 non-empty clusters of 20")
    assert all(name in readme for name in CIFAR10_CLASSES)
    assert f"5\t2\tbird\t1\t20\t{pngs[5]}" in readme


def test_cluster_grids_one_subclass_and_cap(data, tmp_path):
    images, labels, _ = data
    save_cluster_grids(images, labels, labels, num_subclasses=1, out_dir=tmp_path, max_per_cluster=16)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [f"class_{c:03d}.png" for c in range(10)]
    assert Image.open(tmp_path / "class_000.png").size == (8 * 34 + 2, 2 * 34 + 2)  # capped at 16
    assert "\t40\t" in (tmp_path / "README.txt").read_text()


def test_a_cache_write_that_fails_is_a_warning(data, fitted, tmp_path, monkeypatch):
    """Root on a read-only mount or a full disk: the write fails where os.access saw no problem."""
    import errno
    import os

    images, labels, _ = data

    def full_disk(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.warns(UserWarning, match=r"not cached: cannot write .*kmeans_.*\(No space left on device\)"):
        assignment = cluster_assignments(images, labels, num_subclasses=2, seed=0, cache_dir=tmp_path)
    assert torch.equal(assignment, fitted) and list(tmp_path.iterdir()) == []  # no temp file either


def test_cache_folder_falls_back_when_the_data_folder_is_read_only(tmp_path, monkeypatch):
    import os

    from cfm.method.clustering import kmeans_cache_dir

    data_dir, cache_home = tmp_path / "data", tmp_path / "xdg"
    data_dir.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    assert kmeans_cache_dir(data_dir) == data_dir
    access = os.access
    unwritable = [str(data_dir)]
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if str(path) in unwritable
                        else access(path, mode, **kw))
    assert kmeans_cache_dir(data_dir) == cache_home / "cifar10-flow-matching"  # created when written
    unwritable.append(str(tmp_path))  # the nearest existing folder of the cache home
    with pytest.warns(UserWarning, match="recomputed at every start"):
        assert kmeans_cache_dir(data_dir) is None
