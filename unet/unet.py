"""The published ``UNetModelWrapper`` (TorchCFM's ``unet`` package): the published import surface.

Code written for the published example builds its network as
``UNetModelWrapper(dim=(3, 32, 32), num_channels=128, num_res_blocks=2, ...)`` and calls it as
``net(t, x)``. Here that class is a thin subclass of ``cfm.method.unet.UNetModel`` (the library's
ADM UNet, whose module names are the published ones), so published weights load with
``strict=True`` and a wrapper is a ``UNetModel`` wherever the library takes one.

Published arguments this UNet implements are accepted; every other value is refused with one
sentence naming the argument (see ``_refusal``), never silently ignored.
"""

from cfm.method.unet import UNetModel

# channel_mult=None picks the published multipliers by image size (dim[-1]).
CHANNEL_MULT_BY_SIZE = {
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
    28: (1, 2, 2),
}

# Published switches whose True value this UNet does not implement -> why, and what to pass.
_UNSUPPORTED = {
    "learn_sigma": "a flow-matching UNet outputs only the velocity, so pass learn_sigma=False",
    "use_checkpoint": "this UNet has no gradient checkpointing, so pass use_checkpoint=False",
    "use_scale_shift_norm": "this UNet adds the time embedding (the published CIFAR-10 layout), "
                            "so pass use_scale_shift_norm=False",
    "resblock_updown": "this UNet resamples with convolutions, so pass resblock_updown=False",
    "use_fp16": "this UNet keeps float32 weights (use autocast for mixed precision), so pass use_fp16=False",
    "use_new_attention_order": "this UNet's attention splits q, k, v in the legacy order of the published "
                               "weights, so pass use_new_attention_order=False",
}


def _refusal(switches, num_heads, num_head_channels, num_heads_upsample):
    """The one-sentence reason these published arguments cannot be honoured, or None."""
    for name, value in switches.items():
        if value:
            return f"{name}={value!r} is not supported: {_UNSUPPORTED[name]}."
    # With num_head_channels set, the published decoder derives its heads from it and ignores
    # num_heads_upsample; only with num_head_channels=-1 would another value change the network.
    if num_head_channels == -1 and num_heads_upsample not in (-1, num_heads):
        return (f"num_heads_upsample={num_heads_upsample} is not supported: the decoder's attention uses "
                f"num_heads={num_heads} heads, so pass num_heads_upsample=-1.")
    return None


class UNetModelWrapper(UNetModel):
    """``UNetModel`` built from the published wrapper's arguments; ``forward(t, x, y=None)``.

    Args (published names; those not listed below are refused unless at their default):
        dim: (channels, height, width) of the data.
        num_channels, num_res_blocks, attention_resolutions, num_heads, num_head_channels, dropout:
            as ``UNetModel``.
        channel_mult: per-level width multipliers; None picks the published ones by image size
            (``CHANNEL_MULT_BY_SIZE``: 32 -> (1, 2, 2, 2), 28 -> (1, 2, 2), 64, 128, 256).
        class_cond, num_classes: with class_cond=True, a label embedding of num_classes + 1 rows (the
            last one the null label of classifier-free guidance) added to the time embedding;
            ``forward(t, x, y)`` with y in 0..num_classes (None: the null label).
        num_heads_upsample: -1 or num_heads (any value when num_head_channels != -1, where the
            published code ignores it).
        learn_sigma, use_checkpoint, use_scale_shift_norm, resblock_updown, use_fp16,
            use_new_attention_order: only False.

    Raises ValueError (one sentence naming the argument) for an argument it cannot honour.
    """

    def __init__(self, dim, num_channels, num_res_blocks, channel_mult=None, learn_sigma=False, class_cond=False,
                 num_classes=1000, use_checkpoint=False, attention_resolutions="16", num_heads=1,
                 num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False, dropout=0,
                 resblock_updown=False, use_fp16=False, use_new_attention_order=False):
        switches = dict(learn_sigma=learn_sigma, use_checkpoint=use_checkpoint,
                        use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
                        use_fp16=use_fp16, use_new_attention_order=use_new_attention_order)
        reason = _refusal(switches, num_heads, num_head_channels, num_heads_upsample)
        if reason is not None:
            raise ValueError(reason)
        if channel_mult is None:
            size = dim[-1]
            if size not in CHANNEL_MULT_BY_SIZE:
                raise ValueError(f"channel_mult=None has no published default for {size}-pixel images "
                                 f"(only {', '.join(map(str, sorted(CHANNEL_MULT_BY_SIZE)))}): pass channel_mult.")
            channel_mult = CHANNEL_MULT_BY_SIZE[size]
        super().__init__(dim=tuple(dim), num_channels=num_channels, num_res_blocks=num_res_blocks,
                         channel_mult=tuple(channel_mult), attention_resolutions=attention_resolutions,
                         num_heads=num_heads, num_head_channels=num_head_channels, dropout=dropout,
                         num_classes=num_classes if class_cond else None)
