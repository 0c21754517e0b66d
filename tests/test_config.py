"""Settings as data: the configs import neither absl nor torch, no library module defines or reads
a flag, `check_config` refuses what absl refuses with absl's sentence, the published scripts record
their flags byte for byte as before the configs (golden records), and the README's notebook example
trains and samples without absl."""

import ast
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from absl import flags
from conftest import SUBPROCESS_TIMEOUT_S, write_fake_cifar10

from cfm import config as cfg
from cfm.cli.flag_defs import define
from cfm.config import choices
from cfm.io import errors

REPO = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((REPO / "tests/data/golden/flag_records.json").read_text())


def library_modules():
    """Every module of cfm/ but the command line (cfm/cli/), as files."""
    return sorted(p for p in (REPO / "cfm").rglob("*.py") if "cli" not in p.relative_to(REPO / "cfm").parts)


def run_python(code: str, cwd=REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S)


def test_the_configs_import_neither_absl_nor_torch():
    proc = run_python("import sys, cfm.config; "
                      "print(sorted(m for m in sys.modules if m.split('.')[0] in ('absl', 'torch')))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_importing_every_library_module_defines_no_flag():
    """One process imports every module of cfm but cfm/cli: absl's registry holds only absl's own flags."""
    names = [".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__") for p in library_modules()]
    proc = run_python("import importlib, sys\nfrom absl import flags\n"
                      f"for name in {names!r}:\n    importlib.import_module(name)\n"
                      "print(sorted(m for m in flags.FLAGS.flags_by_module_dict() if not m.startswith('absl')))")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def flag_uses(source: str) -> list[str]:
    """Where `source` touches absl flags: imports of absl.flags, the name FLAGS, a parameter FLAGS."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module == "absl" and any(a.name == "flags" for a in node.names):
            found.append(f"{node.lineno}: from absl import flags")
        elif isinstance(node, ast.Import) and any(a.name.startswith("absl.flags") for a in node.names):
            found.append(f"{node.lineno}: import absl.flags")
        elif isinstance(node, ast.Name) and node.id == "FLAGS":
            found.append(f"{node.lineno}: FLAGS")
        elif isinstance(node, ast.arg) and node.arg == "FLAGS":
            found.append(f"{node.lineno}: parameter FLAGS")
    return found


def test_no_library_function_takes_or_reads_flags():
    uses = {str(p.relative_to(REPO)): flag_uses(p.read_text()) for p in library_modules()}
    assert {name: found for name, found in uses.items() if found} == {}


def test_the_flag_check_finds_a_function_that_reads_flags():
    """The check itself: a parameter named FLAGS, a read of it, and absl's flags module are each found."""
    source = (REPO / "cfm/training/checks.py").read_text()
    assert flag_uses(source) == []
    assert flag_uses(source + "\n\ndef f(FLAGS):\n    return FLAGS.lr\n") != []
    assert flag_uses(source + "\nfrom absl import flags\n") != []


# (config group, field, a value absl refuses, as typed on the command line)
REFUSED = [
    (cfg.OptimConfig, "total_steps", 0, "0"),
    (cfg.OptimConfig, "warmup", -1, "-1"),
    (cfg.OptimConfig, "ema_decay", 2.5, "2.5"),
    (cfg.FlowConfig, "model", "ddpm", "ddpm"),
    (cfg.FlowConfig, "sigma", -0.5, "-0.5"),
    (cfg.RunConfig, "collective_timeout", 0.5, "0.5"),
    (cfg.RunConfig, "collective_timeout", float("inf"), "inf"),
    (cfg.FIDConfig, "fid_num_gen", -2, "-2"),
    (cfg.UNetConfig, "num_channel", 0, "0"),
    (cfg.UNetConfig, "attention_resolutions", "16,x", "16,x"),
    (cfg.ClusterConfig, "cluster_algorithm", "kmedoids", "kmedoids"),
    (cfg.AnchorConfig, "anchor_loss_type", "half", "half"),
    (cfg.CheckpointSpec, "pretrained", "si", "si"),
]


@pytest.mark.parametrize("group, name, value, typed", REFUSED, ids=[case[1] for case in REFUSED])
def test_check_config_refuses_what_absl_refuses_with_its_sentence(group, name, value, typed):
    flag_values = flags.FlagValues()
    define(group, name, "help", flag_values=flag_values)
    with pytest.raises(flags.IllegalFlagValueError) as parsed:
        flag_values(["prog", f"--{name}={typed}"])
    with pytest.raises(errors.UserError) as checked:
        cfg.check_config(group(**{name: value}))
    assert str(checked.value) == str(parsed.value)
    cfg.check_config(group())  # the defaults pass


def test_check_config_refuses_a_list_of_non_positive_integers_and_looks_inside_groups():
    bad = dataclasses.replace(cfg.TrainConfig(), unet=cfg.UNetConfig(channel_mult=(1, 0)))
    with pytest.raises(errors.UserError, match=r"^flag --channel_mult=\[1, 0\]: must be comma-separated positive"):
        cfg.check_config(bad)


def test_every_enum_setting_takes_the_values_its_library_module_acts_on():
    """choices.py is the one list of each enum; the modules that act on them import it (not a copy)."""
    from cfm.evaluation import pretrained, solvers
    from cfm.io import distributed
    from cfm.method import clustering, flow_matching, regularizers, unet
    from cfm.training import fast_path

    assert flow_matching.MATCHERS is choices.MATCHERS and solvers.SOLVERS is choices.SOLVERS
    assert clustering.CLUSTER_ALGORITHMS is choices.CLUSTER_ALGORITHMS
    assert {fast_path.resolve_precision(p, torch.device("cpu")) for p in choices.PRECISIONS} <= {"fp32", "bf16"}
    assert regularizers.ANCHOR_LOSS_TYPES is choices.ANCHOR_LOSS_TYPES and unet.PAPER_CONFIG is choices.PAPER_CONFIG
    assert tuple(pretrained.PUBLISHED) == choices.PUBLISHED_WEIGHTS
    assert distributed.DEFAULT_COLLECTIVE_TIMEOUT_S == choices.DEFAULT_COLLECTIVE_TIMEOUT_S


def fill(text, paths):
    return text.format(**paths) if isinstance(text, str) else text


@pytest.mark.parametrize("golden", GOLDEN, ids=[g["script"] for g in GOLDEN])
def test_the_scripts_record_their_flags_as_before_the_configs(golden, fake_cifar, tmp_path):
    """tests/data/golden/flag_records.json: `ckpt["flags"]` of each training script, written by the
    code before the flags became configs (commit 0c4b455), for a command that sets flags of most
    groups. Today's checkpoint holds the same record, key order included (json.dumps compares both)."""
    data_dir, _, _ = fake_cifar
    paths = {"data_dir": str(data_dir), "group_dir": str(tmp_path / "group"), "output_dir": str(tmp_path / "out")}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, golden["script"], *(fill(a, paths) for a in golden["args"])], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = torch.load(tmp_path / "out" / golden["checkpoint"], weights_only=True)["flags"]
    expected = {key: fill(value, paths) for key, value in golden["flags"].items()}
    assert json.dumps(record) == json.dumps(expected)


def test_wandb_gets_the_golden_record_and_a_notebook_config_records_the_same(fake_cifar, tmp_path, monkeypatch):
    """The plain script's wandb config is the golden record (plus provenance), and a TrainConfig built in
    Python with the same settings records the same flags."""
    import wandb

    import train_cifar10  # noqa: F401  (defines its flags)
    from cfm.cli import training_flags

    data_dir, _, _ = fake_cifar
    golden = GOLDEN[0]
    paths = {"data_dir": str(data_dir), "group_dir": str(tmp_path / "group"), "output_dir": str(tmp_path / "out")}
    seen = {}
    real_init = wandb.init
    monkeypatch.setattr(wandb, "init", lambda **kwargs: seen.update(kwargs["config"]) or real_init(**kwargs))
    flags.FLAGS.unparse_flags()
    flags.FLAGS([golden["script"], *(fill(a, paths) for a in golden["args"])])
    config = training_flags.train_config(cfg.MonitorConfig)
    train_cifar10.main([])
    expected = {key: fill(value, paths) for key, value in golden["flags"].items()}
    assert json.dumps({k: v for k, v in seen.items() if k != "provenance"}) == json.dumps(expected)
    in_python = cfg.TrainConfig(
        flow=cfg.FlowConfig(model="icfm"), paths=cfg.PathsConfig(output_dir=paths["output_dir"], data_dir=str(data_dir)),
        unet=cfg.UNetConfig(num_channel=32, num_res_blocks=1, channel_mult=(1, 2), num_head_channels=16),
        optim=cfg.OptimConfig(lr=1e-4, total_steps=2, warmup=1, batch_size=4, seed=3),
        run=cfg.RunConfig(save_step=1, log_step=1, grid_size=4, grid_steps=2, wandb_mode="disabled", device="cpu"),
        cluster=cfg.ClusterConfig(num_subclasses=2, visualize=False, group_dir=paths["group_dir"]))
    assert in_python == config
    assert json.dumps(cfg.flag_record(in_python)) == json.dumps(expected)


def test_a_flag_not_given_is_none_so_resume_keeps_the_checkpoints_architecture():
    """--num_channel and --num_subclasses not on the command line are None in the config (the
    checkpoint's values win on resume); given, they are the typed values; --lr is always the flag's."""
    import train_cifar10  # noqa: F401
    from cfm.cli import training_flags

    flags.FLAGS.unparse_flags()
    flags.FLAGS(["train_cifar10.py", "--lr=1e-3"])
    config = training_flags.train_config(cfg.MonitorConfig)
    assert config.unet == cfg.UNetConfig() and config.cluster.num_subclasses is None and config.optim.lr == 1e-3
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["train_cifar10.py", "--channel_mult=1,2", "--num_subclasses=3"])
    config = training_flags.train_config(cfg.MonitorConfig)
    assert config.unet.channel_mult == (1, 2) and config.cluster.num_subclasses == 3
    assert cfg.flag_record(cfg.TrainConfig())["num_channel"] == 128  # recorded as absl did: the default


def readme_notebook_example() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- notebook example: tests/test_config.py runs this block -->\n```python\n(.*?)```",
                      text, re.S)
    assert match, "README.md lost its notebook example"
    return match.group(1)


def test_the_readme_notebook_example_trains_and_samples_without_absl(tmp_path):
    """The README's example, verbatim, in a fresh process in a folder holding a fake CIFAR-10 in
    ./data: 3 steps of the locality recipe, then samples from the checkpoint, with absl's flags never
    parsed (a library function reading one would raise UnparsedFlagAccessError)."""
    write_fake_cifar10(tmp_path / "data")
    code = readme_notebook_example() + (
        "\nfrom absl import flags\nassert not flags.FLAGS.is_parsed()\n"
        "print(path.name, tuple(samples.shape), samples.dtype)\n")
    proc = run_python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("otcfm_cifar10_local_1e0_weights_step_2.pt (16, 3, 32, 32) torch.uint8")
    metrics = (tmp_path / "results/otcfm_local_1e0/otcfm_cifar10_local_1e0_metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in metrics if '"local_loss"' in line]
    assert [r["step"] for r in logged] == [0, 1, 2] and all(r["local_loss"] > 0 for r in logged)
