"""FID: the Frechet distance against scipy, the whole pipeline against clean-fid itself (with a small
stand-in feature extractor instead of Inception), and the offline lookup / error paths. Never downloads."""

import io
import math
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from conftest import write_fake_cifar10
from PIL import Image
from scipy import linalg

from cfm.evaluation import fid
from cfm.evaluation.sampling import generate_samples


def random_gaussian(rng, dim):
    mu = rng.normal(size=dim)
    root = rng.normal(size=(dim, dim)) / math.sqrt(dim)
    return mu, root @ root.T + 0.1 * np.eye(dim)


def scipy_reference(mu1, s1, mu2, s2):
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))


@pytest.mark.parametrize("dim", [1, 16, 64])
def test_frechet_distance_matches_the_scipy_formula(dim):
    rng = np.random.default_rng(dim)
    (mu1, s1), (mu2, s2) = random_gaussian(rng, dim), random_gaussian(rng, dim)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_reference(mu1, s1, mu2, s2), rel=1e-6)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_of_1d_gaussians_is_closed_form():
    # (m1 - m2)^2 + (sd1 - sd2)^2 in one dimension.
    assert fid.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9 + 1, rel=1e-12)


class RandomProjection:
    """Stand-in for Inception: a fixed random linear map of the image to 64 features.

    Inputs are rounded first: clean-fid's folder reader gives x / 255 * 255 in float32, which can be
    one ulp off the integer; rounding makes both pipelines see identical values.
    """

    def __init__(self, dim=64):
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.randn(3 * 32 * 32, dim, generator=generator, dtype=torch.float64) / 32
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        return images.double().round().reshape(len(images), -1) @ self.weight


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, no clean-fid cache, no environment overrides."""

    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    cache = tmp_path / "cleanfid-cache"
    monkeypatch.setattr(fid, "cleanfid_cache_path", lambda filename: cache / filename)
    monkeypatch.delenv(fid.INCEPTION_ENV, raising=False)
    monkeypatch.delenv(fid.STATS_ENV, raising=False)


def place_dummy_inception(data_dir):
    path = data_dir / "fid" / fid.INCEPTION_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not loaded: the tests pass a stand-in extractor")
    return path


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # clean-fid's sqrtm(disp=False)
def test_pipeline_with_stats_computed_from_local_cifar_matches_clean_fid(offline, tmp_path):
    from cleanfid import fid as cleanfid_fid

    data_dir = tmp_path / "data"
    train, _ = write_fake_cifar10(data_dir, per_batch=40)  # 200 train images, more than 64 features
    place_dummy_inception(data_dir)
    generated = torch.from_numpy(np.random.default_rng(1).integers(0, 256, size=(200, 3, 32, 32), dtype=np.uint8))
    extractor = RandomProjection()

    scorer = fid.FIDScorer.prepare(data_dir=data_dir, extractor=extractor, batch_size=64)
    assert scorer.stats_source == "computed"
    assert scorer.stats_path == data_dir / "fid" / fid.stats_filename("train", computed=True)
    assert scorer.stats_path.is_file()
    ours = scorer.fid_of_batches(generated.split(50))

    # clean-fid: reference images as PNG files (its folder reader), generated ones from a generator.
    folder = tmp_path / "reference"
    folder.mkdir()
    for i, image in enumerate(train):
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i:04d}.png")
    batches = iter(generated.split(50))
    theirs = cleanfid_fid.compute_fid(
        gen=lambda z: next(batches), fdir2=str(folder), mode="legacy_tensorflow", custom_feat_extractor=extractor,
        num_gen=200, batch_size=50, z_dim=1, num_workers=0, device=torch.device("cpu"), verbose=False,
        use_dataparallel=False,
    )
    assert ours > 1.0
    assert ours == pytest.approx(theirs, rel=1e-6)

    # The cached statistics are reused: no reference features are extracted a second time.
    calls = extractor.calls
    again = fid.FIDScorer.prepare(data_dir=data_dir, extractor=extractor)
    assert again.stats_source == "computed" and extractor.calls == calls
    assert again.fid_of_batches([generated]) == pytest.approx(ours, rel=1e-12)


def test_test_split_statistics_fall_back_to_the_local_test_set_and_are_cached(offline, tmp_path):
    from cfm.io.cifar10 import load_cifar10

    data_dir = tmp_path / "data"
    write_fake_cifar10(data_dir, per_batch=80)  # 80 test images, more than the 64 features
    place_dummy_inception(data_dir)
    extractor = RandomProjection()
    scorer = fid.FIDScorer.prepare(data_dir=data_dir, extractor=extractor, split="test")
    assert scorer.stats_source == "computed"
    assert scorer.stats_path == data_dir / "fid" / "cifar10_legacy_tensorflow_test_32_computed.npz"
    test_images, _ = load_cifar10(data_dir, train=False)
    mu, sigma = fid.feature_statistics(fid.extract_features(extractor, test_images))
    assert np.allclose(scorer.ref_mu, mu, rtol=1e-12) and np.allclose(scorer.ref_sigma, sigma, rtol=1e-12)
    train_images, _ = load_cifar10(data_dir, train=True)
    assert not np.allclose(scorer.ref_mu, extractor(train_images).mean(0).numpy())  # not the train statistics
    calls = extractor.calls
    again = fid.FIDScorer.prepare(data_dir=data_dir, extractor=extractor, split="test")
    assert again.stats_path == scorer.stats_path and extractor.calls == calls  # read from the cache
    assert not (data_dir / "fid" / fid.stats_filename("train", computed=True)).exists()


class ConstantVelocity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(0.3))
        self.config = {"dim": [3, 32, 32]}

    def forward(self, t, x):
        return self.c.expand_as(x)


def test_evaluate_net_scores_the_samples_generate_samples_returns(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = random_gaussian(rng, 64)
    scorer = fid.FIDScorer(RandomProjection(), mu * 100, sigma * 1e4)
    result = scorer.evaluate_net(ConstantVelocity(), num_gen=100, batch_size=40, method="midpoint", steps=2,
                                 seed=5, keep_samples=True)
    samples, mean_nfe = generate_samples(ConstantVelocity(), 100, batch_size=40, method="midpoint", steps=2, seed=5)
    assert torch.equal(result.samples, samples)
    assert result.mean_nfe == mean_nfe == 4 and result.num_gen == 100
    assert result.fid == pytest.approx(scorer.fid_of_batches([samples]), rel=1e-12)


def test_offline_without_files_is_one_clear_sentence(offline, tmp_path):
    data_dir = tmp_path / "data"
    with pytest.raises(fid.FIDUnavailable) as err:
        fid.resolve_fid_files(data_dir=data_dir)
    message = str(err.value)
    assert fid.INCEPTION_FILENAME in message and fid.stats_filename("train") in message
    assert str(data_dir / "fid") in message and "URLError" in message
    assert "\n" not in message and message.count(". ") == 0
    assert not (data_dir / "fid" / fid.INCEPTION_FILENAME).exists()  # no partial download left behind
    with pytest.raises(fid.FIDUnavailable, match="does not exist"):
        fid.resolve_fid_files(inception_path=tmp_path / "nowhere.pt", data_dir=data_dir)


def test_ready_with_local_files_and_env_override(offline, tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    place_dummy_inception(data_dir)
    # Inception alone is not enough offline without CIFAR-10 to compute the statistics from.
    with pytest.raises(fid.FIDUnavailable, match=fid.stats_filename("train")):
        fid.resolve_fid_files(data_dir=data_dir)
    stats = tmp_path / "elsewhere" / "my_stats.npz"
    fid.save_statistics(stats, np.zeros(4), np.eye(4))
    monkeypatch.setenv(fid.STATS_ENV, str(stats))
    files = fid.resolve_fid_files(data_dir=data_dir)
    assert files.stats == stats and files.stats_source == "given"
    mu, sigma = fid.load_statistics(stats)
    assert np.array_equal(mu, np.zeros(4)) and np.array_equal(sigma, np.eye(4))


@pytest.mark.parametrize("split", fid.SPLITS)
def test_missing_statistics_are_downloaded_into_the_data_dir(offline, tmp_path, monkeypatch, split):
    payload = io.BytesIO()
    np.savez(payload, mu=np.ones(3), sigma=2 * np.eye(3))
    seen = []

    def serve(url, *args, **kwargs):
        seen.append(url)
        return io.BytesIO(payload.getvalue())

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    data_dir = tmp_path / "data"
    place_dummy_inception(data_dir)
    files = fid.resolve_fid_files(data_dir=data_dir, split=split)
    assert seen == [f"{fid.STATS_BASE_URL}/cifar10_legacy_tensorflow_{split}_32.npz"]  # clean-fid's published names
    assert files.stats == data_dir / "fid" / fid.stats_filename(split) and files.stats_source == "published"
    mu, sigma = fid.load_statistics(files.stats)
    assert np.array_equal(mu, np.ones(3)) and np.array_equal(sigma, 2 * np.eye(3))


def test_a_broken_or_misnamed_inception_file_is_reported(offline, tmp_path):
    broken = place_dummy_inception(tmp_path)
    with pytest.raises(fid.FIDUnavailable, match="is not the Inception torchscript file"):
        fid.load_inception(broken)
    misnamed = tmp_path / "inception.pt"
    misnamed.write_bytes(b"x")
    with pytest.raises(fid.FIDUnavailable, match="must be named inception-2015-12-05.pt"):
        fid.resolve_fid_files(inception_path=misnamed, data_dir=tmp_path)
