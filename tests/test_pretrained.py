"""Published weights by name: download from a local HTTP server, the cache, atomic refusal of wrong files,
and what the verification refuses: a file whose weight sets, keys, shapes or dtypes (size) are not the release's."""

import pytest
import torch
from conftest import TINY_UNET_CONFIG

from cfm.evaluation import pretrained
from cfm.method.nets import build_net_from_checkpoint
from cfm.method.unet import UNetModel

NAME, FILE = "otcfm", "otcfm_cifar10_weights_step_400000.pt"


def tiny_checkpoint(path, prefix="module."):
    """A published-style file (DataParallel prefixes, no unet_config) of a tiny UNet."""
    torch.manual_seed(0)
    state = {f"{prefix}{k}": v for k, v in UNetModel(**TINY_UNET_CONFIG).state_dict().items()}
    torch.save({"net_model": state, "ema_model": dict(state), "step": 400000}, path)  # two weight sets, as released
    return state


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != FILE) if folder.is_dir() else []


def test_release_names_and_url():
    assert pretrained.PUBLISHED == {"otcfm": "otcfm_cifar10_weights_step_400000.pt",
                                    "icfm": "cfm_cifar10_weights_step_400000.pt",
                                    "fm": "fm_cifar10_weights_step_400000.pt"}
    assert pretrained.RELEASE_URL == "https://github.com/atong01/conditional-flow-matching/releases/download/1.0.4"


def test_download_is_verified_then_cached(file_server, tmp_path, monkeypatch):
    folder, url, requests = file_server
    state = tiny_checkpoint(folder / FILE)
    monkeypatch.setenv(pretrained.URL_ENV, url + "/")
    data_dir = tmp_path / "data"
    path, ckpt = pretrained.published_checkpoint(NAME, data_dir, config=TINY_UNET_CONFIG, progress=False)
    assert path == data_dir / "weights" / FILE and requests == [f"/{FILE}"]
    assert ckpt["unet_config"] == TINY_UNET_CONFIG and ckpt["step"] == 400000
    net = build_net_from_checkpoint(ckpt)  # rebuilt as the UNet it was checked against, weights loaded
    assert all(torch.equal(v, state[f"module.{k}"]) for k, v in net.state_dict().items())
    assert leftovers(path.parent) == []  # no partial or staging file
    # Cached: no second request, even with the server gone.
    monkeypatch.setenv(pretrained.URL_ENV, "http://127.0.0.1:9")
    again, _ = pretrained.published_checkpoint(NAME, data_dir, config=TINY_UNET_CONFIG, progress=False)
    assert again == path and requests == [f"/{FILE}"]


def test_a_file_that_is_not_the_expected_unet_is_refused_and_not_cached(file_server, tmp_path, monkeypatch):
    folder, url, requests = file_server
    tiny_checkpoint(folder / FILE)
    monkeypatch.setenv(pretrained.URL_ENV, url)
    data_dir = tmp_path / "data"
    with pytest.raises(pretrained.WeightsUnavailable) as err:  # the paper UNet is expected by default
        pretrained.published_checkpoint(NAME, data_dir, progress=False)
    message = str(err.value)
    assert "was not kept" in message and "does not fit this UNet" in message and f"{url}/{FILE}" in message
    assert "\n" not in message
    assert not (data_dir / "weights" / FILE).exists() and leftovers(data_dir / "weights") == []
    # The same file under a config it fits is accepted: the check compares with the expected UNet.
    path, _ = pretrained.published_checkpoint(NAME, data_dir, config=TINY_UNET_CONFIG, progress=False)
    assert path.is_file() and len(requests) == 2


def test_a_truncated_transfer_is_refused_and_leaves_nothing(file_server, tmp_path, monkeypatch):
    folder, url, _ = file_server
    tiny_checkpoint(tmp_path / "whole.pt")
    (folder / FILE).write_bytes((tmp_path / "whole.pt").read_bytes()[:5000])  # a cut-off file
    monkeypatch.setenv(pretrained.URL_ENV, url)
    data_dir = tmp_path / "data"
    with pytest.raises(pretrained.WeightsUnavailable, match="cannot be read"):
        pretrained.published_checkpoint(NAME, data_dir, config=TINY_UNET_CONFIG, progress=False)
    assert leftovers(data_dir / "weights") == [] and not (data_dir / "weights" / FILE).exists()


def test_offline_names_the_url_and_where_to_put_the_file(file_server, tmp_path, monkeypatch):
    _, url, requests = file_server  # serves an empty folder: 404
    monkeypatch.setenv(pretrained.URL_ENV, url)
    with pytest.raises(pretrained.WeightsUnavailable) as err:
        pretrained.published_checkpoint("icfm", tmp_path / "data", progress=False)
    message = str(err.value)
    target = tmp_path / "data" / "weights" / "cfm_cifar10_weights_step_400000.pt"
    assert f"cannot download {url}/cfm_cifar10_weights_step_400000.pt" in message and f"put it at {target}" in message
    assert "HTTPError" in message and "\n" not in message and message.count(". ") == 0
    assert requests == ["/cfm_cifar10_weights_step_400000.pt"] and leftovers(target.parent) == []


def test_a_wrong_file_put_in_the_cache_by_hand_is_refused_and_kept(tmp_path):
    path = tmp_path / "weights" / FILE
    path.parent.mkdir()
    tiny_checkpoint(path, prefix="")
    with pytest.raises(pretrained.WeightsUnavailable, match=f"{path} \\(net_model\\) does not fit this UNet.*delete it"):
        pretrained.published_checkpoint(NAME, tmp_path, progress=False)
    assert path.is_file()  # the user's file: reported, not deleted


def half(ckpt):
    ckpt["ema_model"] = {k: v.half() for k, v in ckpt["ema_model"].items()}


def double(ckpt):
    ckpt["net_model"] = {k: v.double() for k, v in ckpt["net_model"].items()}


def narrower(ckpt):
    ckpt["ema_model"]["module.out.2.weight"] = ckpt["ema_model"]["module.out.2.weight"][:, :-1]


# How a file can differ from the release (made from the tiny UNet's) -> what the refusal says.
WRONG_FILES = {
    "a key missing": (lambda ckpt: ckpt["ema_model"].pop("module.out.2.bias"),
                      r"\(ema_model\) does not fit this UNet \(1 missing keys \(e.g. out.2.bias\)"),
    "a key too many": (lambda ckpt: ckpt["net_model"].update({"module.out.3.weight": torch.zeros(3)}),
                       r"\(net_model\) does not fit this UNet \(1 unexpected keys \(e.g. out.3.weight\)"),
    "a shape": (narrower, r"\(ema_model\) does not fit this UNet \(1 shape mismatches \(e.g. out.2.weight: "
                          r"\(3, 31, 3, 3\) vs \(3, 32, 3, 3\)"),
    "not a tensor": (lambda ckpt: ckpt["net_model"].update({"module.out.2.bias": [0.0, 0.0, 0.0]}),
                     r"\(net_model\) does not fit this UNet \(1 shape mismatches \(e.g. out.2.bias: list vs \(3,\)"),
    "half the size (float16)": (half, r"\(ema_model\) holds torch.float16 weights where the release holds "
                                      r"torch.float32 \(128 tensors"),
    "twice the size (float64)": (double, r"\(net_model\) holds torch.float64 weights where the release holds "
                                         r"torch.float32 \(128 tensors"),
    "no EMA weights": (lambda ckpt: ckpt.pop("ema_model"), "holds no 'ema_model' weights, which every published"),
}


@pytest.mark.parametrize("wrong", list(WRONG_FILES))
def test_verification_refuses_a_file_that_differs_from_the_release(wrong, file_server, tmp_path, monkeypatch):
    """The release file (made here from the tiny UNet: both weight sets, `module.` prefixes, float32)
    is accepted; the same file with one difference is refused, downloaded (not kept) or put in the
    cache by hand (kept, named), in one sentence that says what differs."""
    change, reason = WRONG_FILES[wrong]
    folder, url, _ = file_server
    monkeypatch.setenv(pretrained.URL_ENV, url)
    fetch = lambda data_dir: pretrained.published_checkpoint(NAME, data_dir, config=TINY_UNET_CONFIG,  # noqa: E731
                                                             progress=False)
    tiny_checkpoint(folder / FILE)
    path, _ = fetch(tmp_path / "accepted")  # the file as released: downloaded and kept

    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, folder / FILE)
    with pytest.raises(pretrained.WeightsUnavailable, match=f"was not kept, since {url}/{FILE} {reason}") as err:
        fetch(tmp_path / "downloaded")
    assert "\n" not in str(err.value) and leftovers(tmp_path / "downloaded" / "weights") == []
    assert not (tmp_path / "downloaded" / "weights" / FILE).exists()

    torch.save(ckpt, path)  # the accepted file, changed in the cache
    with pytest.raises(pretrained.WeightsUnavailable, match=f"{path} {reason}.*; delete it to download"):
        fetch(tmp_path / "accepted")
    assert path.is_file()


class CutShort:
    """A response whose connection closes early: read() raises http.client.IncompleteRead."""

    headers = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self, *args):
        import http.client

        raise http.client.IncompleteRead(b"x" * 10, 990)


@pytest.mark.parametrize("base, opener, reason", [
    ("http://127.0.0.1:9", lambda url, timeout=None: CutShort(), "IncompleteRead"),  # cut short mid-transfer
    ("not-a-url", None, "ValueError: unknown url type"),  # a malformed $CFM_WEIGHTS_URL
])
def test_a_download_cut_short_or_a_malformed_url_is_one_sentence(tmp_path, monkeypatch, base, opener, reason):
    import urllib.request

    if opener is not None:
        monkeypatch.setattr(urllib.request, "urlopen", opener)
    monkeypatch.setenv(pretrained.URL_ENV, base)
    with pytest.raises(pretrained.WeightsUnavailable) as err:
        pretrained.published_checkpoint(NAME, tmp_path / "data", progress=False)
    message = str(err.value)
    assert message.startswith(f"cannot download {base}/{FILE} ({reason}") and "\n" not in message
    assert f"put it at {tmp_path / 'data' / 'weights' / FILE}, or check $CFM_WEIGHTS_URL." in message
    assert leftovers(tmp_path / "data" / "weights") == []


def test_a_killed_downloads_temp_file_is_removed_once_its_pid_is_gone(file_server, tmp_path, monkeypatch):
    import subprocess
    import sys

    from cfm.io import atomic_files

    folder, url, _ = file_server
    tiny_checkpoint(folder / FILE)
    monkeypatch.setenv(pretrained.URL_ENV, url)
    weights = tmp_path / "data" / "weights"
    weights.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = weights / f".{FILE}.{atomic_files.HOST}.{dead.pid}.abcdef.tmp"
    elsewhere = weights / f".{FILE}.otherhost.{dead.pid}.abcdef.tmp"  # maybe a live download on another node
    killed.write_bytes(b"partial")
    elsewhere.write_bytes(b"partial")
    pretrained.published_checkpoint(NAME, tmp_path / "data", config=TINY_UNET_CONFIG, progress=False)
    assert leftovers(weights) == [elsewhere.name]
