"""The shared training loop: EMA, schedule, checkpoints, exact resume, the script end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from absl import flags
from conftest import SUBPROCESS_TIMEOUT_S, TINY_UNET_FLAGS
from PIL import Image

import train_cifar10  # defines the training flags
from cfm.io import checkpoint_io, errors, run_files
from cfm.method import nets, samplers
from cfm.method.unet import UNetModel
from cfm.training.trainer import ema_update, warmup_schedule

FLAGS = flags.FLAGS
REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = dict(num_channels=32, num_res_blocks=1, channel_mult=(1, 2), num_head_channels=16)


def tiny_args(data_dir, output_dir, *extra):
    return [*TINY_UNET_FLAGS, "--batch_size=4", "--grid_size=4", "--grid_steps=2", "--log_step=2", "--warmup=2",
            "--num_subclasses=2", f"--group_dir={output_dir}/group", f"--data_dir={data_dir}",
            f"--output_dir={output_dir}", "--wandb_mode=disabled", "--device=cpu", *extra]


def run_plain(args):
    """Parse `args` as the command line of train_cifar10.py and run its main in this process."""
    FLAGS.unparse_flags()
    FLAGS(["train_cifar10.py", *args])
    train_cifar10.main([])


def test_ema_update_is_the_closed_form_average():
    torch.manual_seed(0)
    net, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    ema_update(list(ema.parameters()), list(net.parameters()), 0.9)
    for e, b, p in zip(ema.parameters(), before, net.parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * p)
    ema_update(list(ema.parameters()), list(net.parameters()), 0.0)  # decay 0 copies the net
    assert all(torch.equal(e, p) for e, p in zip(ema.parameters(), net.parameters()))


def test_warmup_is_linear_then_constant():
    f = warmup_schedule(5000)
    assert [f(0), f(2500), f(5000), f(9000)] == [0.0, 0.5, 1.0, 1.0]
    assert warmup_schedule(0)(0) == 1.0


def test_atomic_save_keeps_the_old_file_when_a_save_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint_io.atomic_save({"step": 1}, path)

    def crash(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(errors.SaveError, match=f"cannot write {path} \\(disk full\\)"):
        checkpoint_io.atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_weights_with_wrapper_prefixes_load(prefix):
    torch.manual_seed(0)
    net = UNetModel(**TINY_CONFIG)
    state = {prefix + k: v.clone() + 1 for k, v in net.state_dict().items()}
    other = UNetModel(**TINY_CONFIG)
    nets.load_weights(other, state)
    assert all(torch.equal(other.state_dict()[k], state[prefix + k]) for k in net.state_dict())


def test_weights_that_do_not_fit_name_the_difference():
    small = UNetModel(**TINY_CONFIG).state_dict()
    with pytest.raises(checkpoint_io.CheckpointError, match="shape mismatches .*input_blocks.0.0"):
        nets.load_weights(UNetModel(**{**TINY_CONFIG, "num_channels": 64}), small)


def test_script_runs_the_published_command_end_to_end(fake_cifar, tmp_path):
    data_dir, _, _ = fake_cifar
    published = ["--model=otcfm", "--lr=2e-4", "--ema_decay=0.9999", "--batch_size=128",
                 "--total_steps=400001", "--save_step=20000"]
    overrides = tiny_args(data_dir, tmp_path, "--total_steps=5", "--save_step=2")
    result = subprocess.run([sys.executable, "train_cifar10.py", *published, *overrides], cwd=REPO,
                            capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "otcfm"
    names = sorted(p.name for p in run_dir.glob("*.pt"))
    assert names == [f"otcfm_cifar10_weights_step_{s}.pt" for s in (2, 4)]  # no step 0, last step saved
    ckpt = torch.load(run_dir / "otcfm_cifar10_weights_step_4.pt", weights_only=True)
    assert {"net_model", "ema_model", "sched", "optim", "step"} <= set(ckpt)
    assert ckpt["step"] == 4 and ckpt["unet_config"]["num_channels"] == 32
    assert ckpt["flags"]["model"] == "otcfm" and ckpt["provenance"]["packages"]["torch"] == torch.__version__
    assert ckpt["sched"]["last_epoch"] == 5  # updates 0..4 happened
    for kind in ("normal", "ema"):
        with Image.open(run_dir / f"{kind}_generated_FM_images_step_4.png") as img:
            assert img.size == (2 + 4 * 34, 2 + 34)  # 4 images of 32 px in one row, 2 px padding
    start, *records = [json.loads(line) for line in (run_dir / "otcfm_cifar10_metrics.jsonl").read_text().splitlines()]
    assert start["event"] == "start" and start["provenance"]["packages"]["torch"] == torch.__version__
    assert [r["step"] for r in records] == [0, 2, 4]
    for key in ("loss_fm", "grad_norm", "vector_field_mean_norm", "lr", "step"):
        assert all(key in r for r in records)
    assert records[0]["lr"] == 0.0 and records[1]["lr"] == pytest.approx(2e-4)  # warm-up of 2 steps


def test_published_checkpoint_without_extras_resumes(fake_cifar, tmp_path):
    """TorchCFM checkpoints hold only net_model/ema_model/sched/optim/step, with DataParallel prefixes."""
    data_dir, _, _ = fake_cifar
    run_plain(tiny_args(data_dir, tmp_path, "--total_steps=3", "--save_step=2"))
    ours = torch.load(tmp_path / "otcfm/otcfm_cifar10_weights_step_2.pt", weights_only=True)
    published = {k: ours[k] for k in ("sched", "optim", "step")}
    for key in ("net_model", "ema_model"):
        published[key] = {f"module.{k}": v for k, v in ours[key].items()}
    path = tmp_path / "published.pt"
    torch.save(published, path)
    run_plain(tiny_args(data_dir, tmp_path / "resumed", "--total_steps=4", "--save_step=2", "--ema_decay=0.5",
                        f"--checkpoint_path={path}"))
    resumed = torch.load(tmp_path / "resumed/otcfm/otcfm_cifar10_weights_step_3.pt", weights_only=True)
    assert resumed["step"] == 3 and resumed["sched"]["last_epoch"] == 4
    assert resumed["optim"]["state"][0]["step"].item() == 4  # Adam's state carried over (3 + 1 updates)
    # One update later the EMA is the average of the stored EMA and the new weights (decay 0.5 here):
    for name, ema in resumed["ema_model"].items():
        torch.testing.assert_close(ema, 0.5 * ours["ema_model"][name] + 0.5 * resumed["net_model"][name])


def test_user_errors_are_one_sentence_and_exit_nonzero(fake_cifar, tmp_path, monkeypatch):
    data_dir, _, _ = fake_cifar
    run_plain(tiny_args(data_dir, tmp_path, "--total_steps=3", "--save_step=2"))
    good = tmp_path / "otcfm/otcfm_cifar10_weights_step_2.pt"
    before = good.read_bytes()
    cases = {
        "already holds checkpoints": tiny_args(data_dir, tmp_path, "--total_steps=3"),
        "contradicts the checkpoint's num_channels=32": tiny_args(
            data_dir, tmp_path, f"--checkpoint_path={good}", "--num_channel=64"),
        "contradicts the checkpoint's clusters": tiny_args(
            data_dir, tmp_path, f"--checkpoint_path={good}", "--num_subclasses=3"),
        "must be a positive multiple": tiny_args(data_dir, tmp_path / "x", "--batch_size=0"),
        "does not exist": tiny_args(data_dir, tmp_path / "y", f"--checkpoint_path={tmp_path / 'nope.pt'}"),
    }
    for expected, args in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            run_plain(args)
        message = str(exit_info.value.code)
        assert expected in message and message.startswith("error: ") and "\n" not in message
    assert good.read_bytes() == before  # a failed run never touches a good checkpoint


def test_overwrite_flag_allows_a_fresh_run(fake_cifar, tmp_path):
    data_dir, _, _ = fake_cifar
    run_plain(tiny_args(data_dir, tmp_path, "--total_steps=3", "--save_step=2"))
    run_plain(tiny_args(data_dir, tmp_path, "--total_steps=3", "--save_step=2", "--overwrite", "--seed=1"))
    assert torch.load(tmp_path / "otcfm/otcfm_cifar10_weights_step_2.pt", weights_only=True)["flags"]["seed"] == 1
    lines = (tmp_path / "otcfm/otcfm_cifar10_metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 0, 2]  # start line + 2 logs: the old run's are gone


def test_fid_at_save_steps_is_logged_and_missing_files_never_crash(fake_cifar, tmp_path, monkeypatch):
    import numpy as np

    from cfm.evaluation import fid
    from cfm.evaluation.sampling import generate_samples

    data_dir, _, _ = fake_cifar
    # Offline with no FID files: the run trains on, and says why there is no FID.
    monkeypatch.setattr(fid, "_download", lambda url, dest: "URLError: offline")
    monkeypatch.setattr(fid, "cleanfid_cache_path", lambda filename: tmp_path / "none")
    run_plain(tiny_args(data_dir, tmp_path / "a", "--total_steps=3", "--save_step=2", "--fid_num_gen=4"))
    records = (tmp_path / "a/otcfm/otcfm_cifar10_metrics.jsonl").read_text()
    assert '"fid"' not in records and (tmp_path / "a/otcfm/otcfm_cifar10_weights_step_2.pt").is_file()

    # With files (a stand-in 8-feature extractor and matching statistics), FID is logged at save steps.
    weights = tmp_path / fid.INCEPTION_FILENAME
    weights.write_bytes(b"stand-in")
    projection = torch.randn(3 * 32 * 32, 8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(fid, "load_inception", lambda path, device: lambda x: x.flatten(1).float() @ projection)
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.zeros(8), sigma=np.eye(8))
    run_plain(tiny_args(data_dir, tmp_path / "b", "--total_steps=3", "--save_step=2", "--fid_num_gen=16",
                        "--integration_method=euler", "--integration_steps=2",
                        f"--fid_inception_path={weights}", f"--fid_stats_path={stats}"))
    fids = [json.loads(line) for line in (tmp_path / "b/otcfm/otcfm_cifar10_metrics.jsonl").read_text().splitlines()
            if '"fid"' in line]
    assert [r["step"] for r in fids] == [2]
    assert fids[0]["fid_nfe"] == 2 and fids[0]["fid_num_gen"] == 16 and np.isfinite(fids[0]["fid"])
    # ... and it is the FID of the EMA weights' samples saved in the checkpoint of that step.
    ckpt = torch.load(tmp_path / "b/otcfm/otcfm_cifar10_weights_step_2.pt", weights_only=True)
    images, _ = generate_samples(nets.build_net_from_checkpoint(ckpt), 16, method="euler", steps=2, seed=0)
    mu, sigma = fid.feature_statistics((images.flatten(1).float() @ projection).double().numpy())
    assert fids[0]["fid"] == pytest.approx(fid.frechet_distance(mu, sigma, np.zeros(8), np.eye(8)), rel=1e-6)


def test_metrics_lines_are_valid_json_and_a_torn_line_is_survived(tmp_path):
    path = tmp_path / "metrics.jsonl"
    run_files.append_jsonl(path, {"step": 0, "loss": float("nan"), "terms": [1.0, float("inf")]})
    run_files.append_jsonl(path, {"step": 1, "loss": 0.5})
    for line in path.read_text().splitlines():  # strict JSON: no bare NaN / Infinity
        json.loads(line, parse_constant=lambda name: pytest.fail(f"non-standard constant {name}"))
    with open(path, "a") as f:
        f.write('{"step": ')  # a write torn by a full disk or a kill
    with pytest.warns(UserWarning, match="metrics.jsonl:3"):
        records = run_files.read_jsonl(path)
    assert records == [{"step": 0, "loss": None, "terms": [1.0, None]}, {"step": 1, "loss": 0.5}]
    with pytest.warns(UserWarning):
        run_files.truncate_jsonl(path, keep=lambda r: r["step"] < 1)
    assert run_files.read_jsonl(path) == records[:1]


@pytest.mark.parametrize("failure", ["ENOSPC", "EROFS"])
def test_a_failed_save_is_one_sentence_and_keeps_the_previous_checkpoint(fake_cifar, tmp_path, monkeypatch, failure):
    """The step-4 save fails (disk full while writing; read-only when renaming): the run stops with
    one sentence naming the file and the cause, the step-2 checkpoint is intact, no temp file stays."""
    import errno

    data_dir, _, _ = fake_cifar
    real_save, real_replace = torch.save, os.replace

    def full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f, *args, **kwargs)

    def read_only(src, dst, *args, **kwargs):
        if "step_4" in str(dst):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))
        real_replace(src, dst, *args, **kwargs)

    if failure == "ENOSPC":
        monkeypatch.setattr(torch, "save", full_disk)
    else:
        monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(SystemExit) as exit_info:
        run_plain(tiny_args(data_dir, tmp_path, "--total_steps=5", "--save_step=2", "--monitor_local=False"))
    message = str(exit_info.value.code)
    run_dir = tmp_path / "otcfm"
    assert message.startswith(f"error: cannot write {run_dir / 'otcfm_cifar10_weights_step_4.pt'} (")
    assert os.strerror(getattr(errno, failure)) in message and "\n" not in message
    assert torch.load(run_dir / "otcfm_cifar10_weights_step_2.pt", weights_only=True)["step"] == 2
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*.tmp"))


def test_checkpoints_get_ordinary_permissions(tmp_path):
    """0666 less the umask, as any new file (mkstemp alone would leave 0600: unreadable to the group)."""
    old = os.umask(0o022)
    try:
        path = checkpoint_io.atomic_save({"step": 1}, tmp_path / "ckpt.pt")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_stale_temp_files_of_the_run_are_removed(tmp_path):
    paths = run_files.RunPaths(tmp_path, "otcfm_cifar10")
    stale = [tmp_path / ".otcfm_cifar10_weights_step_20000.pt.a1b2c3d4.tmp", tmp_path / ".otcfm_cifar10_metrics.jsonl.x_9yzabc.tmp"]
    kept = [tmp_path / ".icfm_cifar10_weights_step_20000.pt.a1b2c3d4.tmp",  # another run's
            tmp_path / "otcfm_cifar10_weights_step_20000.pt", tmp_path / "notes.tmp"]
    for path in stale + kept:
        path.write_bytes(b"x")
    assert sorted(paths.remove_stale_temp_files()) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)


def test_read_only_data_dir_trains_with_the_cache_elsewhere(fake_cifar, tmp_path, monkeypatch):
    """A shared read-only --data_dir: the K-means cache goes to $XDG_CACHE_HOME, and without any
    writable cache folder the run trains uncached, with a warning."""
    data_dir, _, _ = fake_cifar
    access = os.access
    unwritable = [str(data_dir)]
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if any(str(path).startswith(p) for p in unwritable)
                        else access(path, mode, **kw))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    before = sorted(data_dir.rglob("*"))
    run_plain(tiny_args(data_dir, tmp_path / "a", "--total_steps=1", "--save_step=0", "--visualize=False"))
    assert len(list((tmp_path / "xdg/cifar10-flow-matching").glob("kmeans_*.pt"))) == 1
    unwritable.append(str(tmp_path / "xdg"))
    with pytest.warns(UserWarning, match="K-means assignment is not cached"):
        run_plain(tiny_args(data_dir, tmp_path / "b", "--total_steps=1", "--save_step=0", "--visualize=False"))
    assert sorted(data_dir.rglob("*")) == before
    assert (tmp_path / "b/otcfm/otcfm_cifar10_metrics.jsonl").is_file()


def test_monitor_local_false_skips_clustering(fake_cifar, tmp_path, monkeypatch):

    data_dir, _, _ = fake_cifar
    monkeypatch.setattr(samplers, "cluster_assignments", lambda *a, **k: pytest.fail("clustered"))
    # --num_subclasses=50 would leave clusters smaller than a batch: no clustering, no refusal.
    run_plain(tiny_args(data_dir, tmp_path, "--total_steps=1", "--save_step=0", "--monitor_local=False",
                        "--num_subclasses=50"))
    (record,) = [json.loads(line) for line in (tmp_path / "otcfm/otcfm_cifar10_metrics.jsonl").read_text().splitlines()][1:]
    assert "loss_fm" in record and "local_loss" not in record
