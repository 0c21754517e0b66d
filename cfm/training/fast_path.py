"""The training forward's fast path: mixed precision, channels-last memory, torch.compile.

`FastForward(module, ...)(t, x)` is ``module(t, x)`` as the training step calls it:

    x  -> channels-last copy (--channels_last)       [B,3,32,32], same values, NHWC strides
    v  =  module(t, x) under autocast (--precision)  bf16 matmuls and convolutions, fp32 weights
    v  -> x's dtype (float32)                        losses, their gradients and the metrics in fp32

bf16 (``--precision=bf16``) is autocast for the forward, and so for the backward it records: the
parameters, their gradients, Adam's moments and the EMA stay float32 (master weights), only the
activations of matmuls and convolutions are bfloat16 (8 bits of mantissa, fp32's range: no loss
scaling is needed). GroupNorm statistics are computed in float32 by the UNet itself (`GroupNorm32`);
attention runs in `scaled_dot_product_attention`, whose fused kernels keep the softmax's running max
and sum in float32. The output is cast back to float32, so the loss ``mean (v - u)^2`` is reduced
in fp32. Sampling (grids, FID) never enters this path: it stays fp32 and eager.

Compilation (``--compile``) wraps the training forward only. The monitor, the sample grids and FID
call the bare module: each new batch shape would cost a recompilation, for code that runs rarely.
The checkpoint is written from the bare module, so its keys carry no ``_orig_mod.`` prefix.

What stays exact: in fp32 and eager, the result does not depend on the world size and a resumed run
equals an uninterrupted one (tests/test_scripts.py, tests/test_reliability.py). bf16 runs are
deterministic on the CPU too, but a bf16 run and an fp32 run are different runs (see
tests/test_fast_path.py for how far apart their losses are).
"""

from __future__ import annotations

import torch
from torch import Tensor


def resolve_precision(flag: str, device: torch.device) -> str:
    """--precision as trained: "auto" is bf16 on a CUDA device with native bf16 (Ampere or newer), else fp32.

    fp32 on the CPU: without native bf16 instructions the CPU runs bf16 convolutions many times slower.
    """
    if flag != "auto":
        return flag
    native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return "bf16" if native else "fp32"


class FastForward:
    """Calls ``module(t, x)`` with the chosen precision, memory format and compilation; see the module docstring.

    Args:
        module: the net (or its DDP wrapper) taking ``t`` [B] and ``x`` [B, 3, H, W].
        device: where it runs (the autocast device type).
        precision: "fp32" or "bf16" (resolved, see `resolve_precision`).
        channels_last: hand ``x`` to the module in channels-last memory format (the module's
            weights should be channels-last too: see `training.build_trainer`).
        compile_mode: a torch.compile mode (`cfm.config.choices.COMPILE_MODES`), or None for eager.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device, precision: str = "fp32",
                 channels_last: bool = False, compile_mode: str | None = None):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16 once resolved, got {precision!r}.")
        self.device_type = device.type
        self.precision = precision
        self.channels_last = channels_last
        # dynamic=False: the training batch shape never changes, so a static graph is all it needs.
        self.module = module if compile_mode is None else torch.compile(module, mode=compile_mode, dynamic=False)

    def __call__(self, t: Tensor, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``v`` [B, 3, H, W] in ``x``'s dtype for times ``t`` [B], states ``x`` [B, 3, H, W] and, for a
        conditional net, labels ``y`` [B] (an unconditional net is called as ``module(t, x)``)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            v = self.module(t, x) if y is None else self.module(t, x, y)
        return v.to(x.dtype)
