"""The package layout: imports point one way (relative ones included; the library imports no entry
script), modules stay small and say what they own, and checkpoints written before the library moved
into cfm/ load and resume after it."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SUBPROCESS_TIMEOUT_S

from cfm.io import checkpoint_io

REPO = Path(__file__).resolve().parents[1]
# The layers from the bottom up: a module may import its own layer and the ones below. config holds
# settings as data (no absl, no torch); cli, the command line, is imported only by scripts and bench.
LAYERS = ("io", "config", "method", "evaluation", "training", "cli")
MAX_LINES = 400


def library_modules():
    return sorted(p for p in (REPO / "cfm").rglob("*.py"))


def layer_of(dotted: str) -> int | None:
    parts = dotted.split(".")
    return LAYERS.index(parts[1]) if parts[0] == "cfm" and len(parts) > 1 and parts[1] in LAYERS else None


def imported_modules(path: Path, name: str | None = None) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in `path`, function-level ones included; relative
    imports are resolved against `name`, the file's repo-relative path (default: `path`'s)."""
    package = list(Path(name or path.relative_to(REPO)).with_suffix("").parts)[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + (node.module.split(".") if node.module else []))
            found += [(node.lineno, f"{module}.{alias.name}" if module in ("cfm", *(f"cfm.{layer}" for layer in LAYERS))
                       else module) for alias in node.names]
    return found


# What sits above the library: the entry scripts and the published surface at the root.
ROOT_MODULES = {p.stem for p in REPO.glob("*.py")} | {"unet"}


def upward_imports(modules: dict[str, Path]) -> list[str]:
    """What imports a layer above its own, for {repo-relative name: file}."""
    bad = []
    for name, path in modules.items():
        own = layer_of(".".join(Path(name).with_suffix("").parts))
        for line, module in imported_modules(path, name):
            target = layer_of(module)
            if own is not None and target is not None and target > own:
                bad.append(f"{name}:{line} imports {module} ({LAYERS[own]} -> {LAYERS[target]})")
            elif own is not None and module.split(".")[0] in ROOT_MODULES:
                bad.append(f"{name}:{line} imports {module} (an entry script or the published surface)")
    return bad


def test_imports_point_down_the_layers():
    """io <- config <- method <- evaluation <- training <- cli: no module imports a layer above its own,
    nor an entry script."""
    assert upward_imports({p.relative_to(REPO).as_posix(): p for p in library_modules()}) == []


def test_the_check_catches_an_upward_import(tmp_path):
    """The check itself: a method module that imports training (even inside a function) is reported."""
    copy = tmp_path / "regularizers.py"
    source = (REPO / "cfm" / "method" / "regularizers.py").read_text()
    copy.write_text(source + "\n\ndef helper():\n    from cfm.training import trainer\n")
    line = len(copy.read_text().splitlines())
    assert upward_imports({"cfm/method/regularizers.py": copy}) == [
        f"cfm/method/regularizers.py:{line} imports cfm.training.trainer (method -> training)"]


@pytest.mark.parametrize("added, reported", [
    ("from ..training import trainer", "cfm.training.trainer (method -> training)"),
    ("from ..config import choices", None),  # a layer below: allowed
    ("from .. import cli", "cfm.cli (method -> cli)"),
    ("import train_cifar10", "train_cifar10 (an entry script or the published surface)"),
    ("from utils_cifar import ema", "utils_cifar (an entry script or the published surface)"),
])
def test_the_check_catches_relative_and_entry_script_imports(tmp_path, added, reported):
    """The check itself: relative imports are resolved, and a library module importing a script is reported."""
    copy = tmp_path / "regularizers.py"
    copy.write_text((REPO / "cfm" / "method" / "regularizers.py").read_text() + f"\n\ndef helper():\n    {added}\n")
    line = len(copy.read_text().splitlines())
    found = upward_imports({"cfm/method/regularizers.py": copy})
    assert found == ([] if reported is None else [f"cfm/method/regularizers.py:{line} imports {reported}"])


def test_every_module_opens_with_a_docstring_and_stays_small():
    for path in library_modules():
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path.relative_to(REPO)} has no opening docstring"
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{path.relative_to(REPO)} has {lines} lines"


def test_the_root_holds_only_entry_scripts():
    """Entry scripts, and the published import surface (samplers.py, utils_cifar.py, unet/)."""
    scripts = sorted(p.name for p in REPO.glob("*.py"))
    assert scripts == ["compute_fid.py", "compute_generalization.py", "compute_locality.py", "plot_results.py",
                       "samplers.py", "train_cifar10.py", "train_cifar10_anchor.py", "train_cifar10_ddp.py",
                       "train_cifar10_locality.py", "utils_cifar.py"]


# The published import surface: thin layers over cfm/, each saying where its names live.
SURFACE = ("samplers.py", "utils_cifar.py", "unet/__init__.py", "unet/unet.py")
SURFACE_MAX_LINES = 150


def test_the_published_surface_is_thin_and_says_where_its_names_live():
    assert sorted(p.relative_to(REPO).as_posix() for p in (REPO / "unet").rglob("*.py")) == ["unet/__init__.py",
                                                                                             "unet/unet.py"]
    for name in SURFACE:
        text = (REPO / name).read_text()
        docstring = ast.get_docstring(ast.parse(text))
        assert docstring and "published" in docstring and "cfm" in docstring, f"{name} has no such opening docstring"
        assert len(text.splitlines()) < SURFACE_MAX_LINES, f"{name} has {len(text.splitlines())} lines"


def test_the_root_unet_package_is_not_the_library_unet():
    """`import unet` is the root package (the published surface), `cfm.method.unet` the library's, and
    no library module imports the root surface (it sits above the library, like the scripts)."""
    import cfm.method.unet
    import unet

    assert Path(unet.__file__) == REPO / "unet" / "__init__.py"
    assert Path(cfm.method.unet.__file__) == REPO / "cfm" / "method" / "unet" / "__init__.py"
    assert issubclass(unet.UNetModelWrapper, cfm.method.unet.UNetModel)
    surface = {"samplers", "utils_cifar", "unet"}
    assert [f"{p.relative_to(REPO)}:{line} imports {module}" for p in library_modules()
            for line, module in imported_modules(p) if module.split(".")[0] in surface] == []


PRE_LAYOUT = REPO / "tests" / "data" / "pre_layout"


def test_a_checkpoint_written_before_the_move_loads_and_resumes_as_it_did(fake_cifar, tmp_path):
    """tests/data/pre_layout/: an anchor run's step-1 checkpoint written by the code before the move
    (commit 0c4fcdb, tiny UNet, fake CIFAR-10), and what that code's resume from it wrote at step 2.
    Today's code reads it with weights_only=True and, resumed for one step, logs the same losses and
    ends with the same weights and centroids."""
    source = PRE_LAYOUT / "otcfm_cifar10_anchor_1e0_weights_step_1.pt"
    expected = json.loads((PRE_LAYOUT / "resumed_step_2.json").read_text())
    ckpt = checkpoint_io.load_checkpoint(source)
    assert ckpt["step"] == 1 and sorted(ckpt) == expected["checkpoint_keys"]
    data_dir, _, _ = fake_cifar
    out = tmp_path / "out"
    args = ["--num_channel=32", "--num_res_blocks=1", "--channel_mult=1", "--attention_resolutions=32",
            "--num_head_channels=32", "--batch_size=4", "--total_steps=3", "--save_step=1", "--log_step=1",
            "--warmup=1", "--num_subclasses=1", "--grid_size=4", "--grid_steps=2", f"--data_dir={data_dir}",
            f"--output_dir={out}", f"--group_dir={out}/group", "--wandb_mode=disabled", "--device=cpu",
            "--centroid_update_freq=1", "--visualize=False", f"--checkpoint_path={source}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "train_cifar10_anchor.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = out / "otcfm_anchor_full"
    resumed = torch.load(run / "otcfm_cifar10_anchor_1e0_weights_step_2.pt", weights_only=True)
    record = [json.loads(line) for line in (run / "otcfm_cifar10_anchor_1e0_metrics.jsonl").read_text().splitlines()
              if "loss" in line][-1]
    assert record["step"] == 2 and record["cluster"] == expected["metrics"]["cluster"]
    for name in ("loss", "loss_fm", "anchor_loss", "grad_norm"):
        assert record[name] == pytest.approx(expected["metrics"][name], rel=1e-5), name
    for key in ("net_model", "ema_model"):
        total = float(sum(v.double().sum() for v in resumed[key].values()))
        assert total == pytest.approx(expected["weight_sums"][key], rel=1e-7), key
    assert float(resumed["regularizer"]["centroids"].double().sum()) == pytest.approx(expected["centroid_sum"], rel=1e-9)
