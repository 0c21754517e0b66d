"""ADM UNet (Dhariwal & Nichol, "Diffusion Models Beat GANs", 2021) as a flow-matching vector field.

This is the network of the TorchCFM CIFAR-10 experiments: no class conditioning, no scale-shift
norm, convolutional resampling, multi-head self-attention at the chosen resolutions. Module names
follow the original layout exactly, so published checkpoints load with ``strict=True``.

Shapes: B batch, C ``num_channels``, E = 4C time-embedding width, H x W image size, T = H * W.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from cfm.config.choices import PAPER_CONFIG


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_state_dict_prefixes(state_dict):
    """Return a new dict whose keys lack leading ``module.`` (DataParallel / DDP) and ``_orig_mod.``
    (torch.compile) prefixes, in any number and order (e.g. ``module._orig_mod.out.2.weight``)."""
    stripped = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


def timestep_embedding(t, dim):
    """Sinusoidal embedding of times ``t`` [B] (used as given, here in [0, 1]) -> [B, dim].

    With half = dim // 2 and f_i = 10000^(-i / half): emb = [cos(t f_0..f_{half-1}), sin(t f_0..)],
    cosines first, as in ADM. Computed in float32 whatever the caller's dtype.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def zero_module(module):
    """Zero a layer's parameters, so the residual branch (or the whole net) starts as identity (zero)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32 groups) computed in float32 and cast back: low-precision statistics are inaccurate.

    The affine parameters are cast too, so this also works when the whole net is in bf16.
    """

    def __init__(self, channels):
        super().__init__(32, channels)

    def forward(self, x):
        out = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


class ResBlock(nn.Module):
    """Residual block conditioned on the time embedding.

    h = conv(silu(norm(x))) + linear(silu(emb))[..., None, None];
    out = skip(x) + conv_zero(dropout(silu(norm(h)))); skip is identity or a 1x1 conv.
    x [B, in_ch, H, W], emb [B, E] -> [B, out_ch, H, W].
    """

    def __init__(self, in_ch, out_ch, emb_ch, dropout):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, out_ch))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_ch),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


def attention_heads(ch, num_heads, num_head_channels):
    """Heads of an attention block over ``ch`` channels: ``ch // num_head_channels``, or
    ``num_heads`` when num_head_channels is -1; None when the heads do not split ``ch`` evenly."""
    if num_head_channels == -1:
        return num_heads if num_heads > 0 and ch % num_heads == 0 else None
    return ch // num_head_channels if num_head_channels > 0 and ch % num_head_channels == 0 else None


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection.

    qkv = conv1x1(norm(x)) [B, 3*ch, T] is split in ADM's "legacy" order: heads outermost, then
    (q, k, v), then the d = ch / heads channels of a head. Each head computes
    softmax(q^T k / sqrt(d)) v; heads are concatenated back to [B, ch, T] and projected by a
    zero-initialised 1x1 conv. x [B, ch, H, W] -> [B, ch, H, W].
    """

    def __init__(self, ch, num_heads, num_head_channels):
        super().__init__()
        self.num_heads = attention_heads(ch, num_heads, num_head_channels)
        if self.num_heads is None:
            raise ValueError(f"{ch} channels do not split into heads (num_heads={num_heads}, "
                             f"num_head_channels={num_head_channels}); change num_head_channels.")
        self.norm = GroupNorm32(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = zero_module(nn.Conv1d(ch, ch, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x).reshape(B, C, H * W))
        # [B, 3C, T] -> [B, heads, 3d, T] -> [B, heads, T, 3d], then q, k, v of [B, heads, T, d] each
        q, k, v = qkv.reshape(B, self.num_heads, -1, H * W).transpose(2, 3).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v)  # default scale 1 / sqrt(d)
        h = h.transpose(2, 3).reshape(B, C, H * W)  # head-major channels, as the legacy layout
        return x + self.proj_out(h).reshape(B, C, H, W)


class Downsample(nn.Module):
    """Stride-2 3x3 conv: [B, ch, H, W] -> [B, ch, H/2, W/2]."""

    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv: [B, ch, H, W] -> [B, ch, 2H, 2W]."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """Sequential that also hands the time embedding to the ResBlocks among its layers."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def normalize_config(config):
    """Construction arguments as canonical plain Python values (lists, str, int, float).

    Two configs describe the same network iff their normalized forms are equal; the result can be
    stored in a checkpoint and read back with ``torch.load(weights_only=True)``.
    """
    resolutions = config["attention_resolutions"]
    if isinstance(resolutions, str):
        resolutions = [r for r in resolutions.split(",") if r.strip()]
    normalized = dict(
        dim=[int(d) for d in config["dim"]],
        num_channels=int(config["num_channels"]),
        num_res_blocks=int(config["num_res_blocks"]),
        channel_mult=[int(m) for m in config["channel_mult"]],
        attention_resolutions=",".join(str(int(r)) for r in resolutions),
        num_heads=int(config["num_heads"]),
        num_head_channels=int(config["num_head_channels"]),
        dropout=float(config["dropout"]),
    )
    # Only a conditional net names its labels: an unconditional config (and checkpoint) is as before.
    if config.get("num_classes") is not None:
        normalized["num_classes"] = int(config["num_classes"])
    return normalized


def check_config(config, names=None):
    """Raise ValueError, one sentence naming the argument to change, if ``config`` does not build the
    network it describes (which would otherwise fail in the first forward pass or, for attention
    resolutions, silently lose the attention).

    ``names`` maps argument names to what the caller calls them (e.g. ``{"num_channels":
    "--num_channel"}``). Rules: GroupNorm32 needs a multiple of 32 channels (every level's width is
    ``num_channels * mult``); the image halves evenly once per level after the first; each attention
    resolution is one of the levels' (32, 16, ... for 32-pixel images); heads split the channels of
    every attention block (those resolutions and the middle block); dropout is a probability.
    """
    config = normalize_config(config)

    def show(arg):
        value = config[arg]
        value = ",".join(map(str, value)) if isinstance(value, list) else value
        return f"{(names or {}).get(arg, arg)}={value}"

    size, C, mults = config["dim"][-1], config["num_channels"], config["channel_mult"]
    if C <= 0 or C % 32:
        raise ValueError(f"{show('num_channels')} is not a positive multiple of 32 (GroupNorm's groups): "
                         f"pick 32, 64, 128, ...")
    if not mults or min(mults) <= 0:
        raise ValueError(f"{show('channel_mult')} needs one or more positive multipliers, e.g. 1,2,2,2.")
    halvings = (size & -size).bit_length() - 1  # times `size` pixels halve evenly
    if len(mults) - 1 > halvings:
        raise ValueError(f"{show('channel_mult')} has {len(mults)} levels but {size}-pixel images halve evenly only "
                         f"{halvings} times: use at most {halvings + 1} multipliers.")
    levels = [size >> level for level in range(len(mults))]  # each level's resolution
    resolutions = [int(r) for r in config["attention_resolutions"].split(",") if r]
    for r in resolutions:
        if r not in levels:
            raise ValueError(f"{show('attention_resolutions')} asks for attention at {r}x{r}, a resolution this UNet "
                             f"does not have: pick among {','.join(map(str, levels))}.")
    # The widths of the attention blocks: the chosen levels' and the middle block's (always there).
    widths = {mults[levels.index(r)] * C for r in resolutions} | {mults[-1] * C}
    if any(attention_heads(ch, config["num_heads"], config["num_head_channels"]) is None for ch in widths):
        arg = "num_head_channels" if config["num_head_channels"] != -1 else "num_heads"
        raise ValueError(f"{show(arg)} does not split the attention blocks' channels "
                         f"({','.join(map(str, sorted(widths)))}) into equal heads: pick a divisor of {math.gcd(*widths)}.")
    if not 0.0 <= config["dropout"] <= 1.0:
        raise ValueError(f"{show('dropout')} is not a probability: pick a value in [0, 1].")
    if config.get("num_classes", 1) < 1:
        raise ValueError(f"{show('num_classes')} is not a number of labels: pick 1 or more (or None: unconditional).")


class UNetModel(nn.Module):
    """ADM UNet predicting the velocity vt(t, x).

    Args:
        dim: (channels, height, width) of the data; output has the same shape.
        num_channels: base width C; level i has C * channel_mult[i] channels.
        num_res_blocks: ResBlocks per level on the way down (one more on the way up).
        channel_mult: width multiplier per level; every level but the last halves the resolution.
        attention_resolutions: image resolutions with self-attention: "16", "16,8" or [16, 8].
        num_heads: heads per attention block, used only when num_head_channels == -1.
        num_head_channels: channels per head (heads = ch // num_head_channels), or -1.
        dropout: dropout rate inside the ResBlocks.
        num_classes: None (unconditional: the published net), or K labels: a label embedding of K + 1
            rows (the last one the null label of classifier-free guidance) added to the time
            embedding, as ADM's ``class_cond`` adds its ``label_emb``.

    ``self.config`` holds these arguments as plain Python values (lists, str, int, float): it can be
    stored in a checkpoint and read with ``torch.load(weights_only=True)``, and
    ``UNetModel(**net.config)`` rebuilds the same architecture. The defaults are PAPER_CONFIG's.
    """

    def __init__(
        self,
        dim=PAPER_CONFIG["dim"],
        num_channels=PAPER_CONFIG["num_channels"],
        num_res_blocks=PAPER_CONFIG["num_res_blocks"],
        channel_mult=PAPER_CONFIG["channel_mult"],
        attention_resolutions=PAPER_CONFIG["attention_resolutions"],
        num_heads=PAPER_CONFIG["num_heads"],
        num_head_channels=PAPER_CONFIG["num_head_channels"],
        dropout=PAPER_CONFIG["dropout"],
        num_classes=None,
    ):
        super().__init__()
        self.config = normalize_config(
            dict(dim=dim, num_channels=num_channels, num_res_blocks=num_res_blocks, channel_mult=channel_mult,
                 attention_resolutions=attention_resolutions, num_heads=num_heads,
                 num_head_channels=num_head_channels, dropout=dropout, num_classes=num_classes)
        )
        check_config(self.config)
        in_ch, image_size = dim[0], dim[-1]
        # Image resolutions with attention -> the downsample factors at which blocks get one.
        attention_ds = {image_size // int(r) for r in self.config["attention_resolutions"].split(",") if r}
        C, E = num_channels, 4 * num_channels
        self.num_channels = C

        def res(ch_in, ch_out):
            return ResBlock(ch_in, ch_out, E, dropout)

        def attn(ch):
            return AttentionBlock(ch, num_heads, num_head_channels)

        self.time_embed = nn.Sequential(nn.Linear(C, E), nn.SiLU(), nn.Linear(E, E))
        self.num_classes = num_classes
        if num_classes is not None:  # created after time_embed: an unconditional net draws the same init
            self.label_emb = nn.Embedding(num_classes + 1, E)

        # Encoder: remember the width of every block output; the decoder consumes them in reverse.
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_ch, C, 3, padding=1))])
        skip_chans, ch, ds = [C], C, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, mult * C)]
                ch = mult * C
                if ds in attention_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = EmbedSequential(res(ch, ch), attn(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), mult * C)]
                ch = mult * C
                if ds in attention_ds:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, in_ch, 3, padding=1)))

    def forward(self, t, x, y=None, **solver_kwargs):
        """Velocity at time t.

        Args:
            t: python float, 0-dim tensor (one time for the whole batch) or [B] tensor, in [0, 1].
            x: [B, *dim] state.
            y: a conditional net's labels, int64 [B] in 0..num_classes (num_classes: the null label),
                or None (every row null); an unconditional net takes None only.
            solver_kwargs: ignored; lets ODE wrappers pass extras (torchdyn calls f(t, x, args={})).

        Returns:
            vt: [B, *dim], same dtype as x.
        """
        t = torch.as_tensor(t, device=x.device)
        if t.numel() == 1:
            t = t.reshape(1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.num_channels).to(x.dtype))
        if self.num_classes is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.int64, device=x.device)
            emb = emb + self.label_emb(y).to(emb.dtype)
        elif y is not None:
            raise ValueError("this UNet is unconditional (num_classes=None): call it without labels.")

        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
