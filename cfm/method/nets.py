"""Nets from checkpoints: strict weight checks (every key and shape) and a UNet built from a
checkpoint's stored construction arguments (ours, or the published TorchCFM ones)."""

from __future__ import annotations

import torch

from cfm.config.settings import value_or_default
from cfm.config.training import ARCH_FLAGS, UNetConfig
from cfm.io import errors
from cfm.io.checkpoint_io import CheckpointError
from cfm.method.unet import PAPER_CONFIG, UNetModel, check_config, normalize_config, strip_state_dict_prefixes


def _shape(value) -> tuple | str:
    """A tensor's shape; for anything else (weights_only also loads lists and numbers) its type's name."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def check_weights(net: torch.nn.Module, state_dict: dict, source: str = "checkpoint") -> dict:
    """`state_dict` without `module.`/`_orig_mod.` prefixes, if its keys and shapes are exactly `net`'s
    and its values finite; else a `CheckpointError` saying what differs (or that the run that wrote
    it had diverged). `net` may live on the meta device (no memory)."""
    state_dict = strip_state_dict_prefixes(state_dict)
    own = net.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if _shape(own[k]) != _shape(state_dict[k]))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: {_shape(state_dict[k])} vs {_shape(own[k])})")
        raise CheckpointError(f"{source} does not fit this UNet ({'; '.join(parts)}): build the UNet it was trained "
                              f"with (e.g. its --num_channel).")
    non_finite = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if non_finite:
        raise CheckpointError(
            f"{source} holds NaN or infinite weights ({len(non_finite)} tensors, e.g. {non_finite[0]}): the run "
            f"that wrote it had diverged; use an earlier checkpoint."
        )
    return state_dict


def load_weights(net: torch.nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """Load a state dict strictly after stripping `module.`/`_orig_mod.` prefixes; say what differs.
    Non-finite weights (a diverged run) are refused."""
    net.load_state_dict(check_weights(net, state_dict, source), strict=True)


def unet_config_from_checkpoint(ckpt: dict, fallback: dict | None = None) -> dict:
    """The UNet construction arguments stored in `ckpt`, else `fallback`, else the paper config.

    Published TorchCFM checkpoints store none: they were trained with the paper config.
    """
    return dict(ckpt.get("unet_config") or fallback or PAPER_CONFIG)


def build_net_from_checkpoint(
    ckpt: dict, use_ema: bool = True, fallback_config: dict | None = None, device="cpu", source: str = "checkpoint"
) -> UNetModel:
    """Rebuild the UNet a checkpoint was trained with and load its EMA (or raw) weights; eval mode."""
    key = "ema_model" if use_ema and "ema_model" in ckpt else "net_model"
    config = unet_config_from_checkpoint(ckpt, fallback_config)
    try:
        check_config(config)
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from err
    net = UNetModel(**config)
    load_weights(net, ckpt[key], source=f"{source} ({key})")
    return net.to(device).eval().requires_grad_(False)


def unet_arguments(unet: UNetConfig, ckpt: dict | None = None) -> dict:
    """`UNetModel`'s construction arguments for a run: the checkpoint's when resuming one that
    stores them (published resume commands give no --num_channel), else the paper config with the
    architecture flags given. A flag given (not None) that contradicts the checkpoint is a
    UserError rather than a silent rebuild."""
    config = dict(PAPER_CONFIG)
    for flag, arg in ARCH_FLAGS.items():
        config[arg] = value_or_default(unet, flag)
    from_flags = normalize_config(config)
    if ckpt is None or "unet_config" not in ckpt:
        return from_flags
    stored = normalize_config(ckpt["unet_config"])
    for flag, arg in ARCH_FLAGS.items():
        given = getattr(unet, flag)
        if given is not None and from_flags[arg] != stored[arg]:
            shown = ",".join(map(str, given)) if isinstance(given, tuple) else given
            raise errors.UserError(
                f"--{flag}={shown} contradicts the checkpoint's {arg}={stored[arg]}: "
                f"drop the flag to resume with the stored architecture."
            )
    return stored
