"""The flags of how an evaluation samples a label-conditioned checkpoint (`GuidanceConfig`), shared by
compute_fid.py and compute_generalization.py, and `guidance_config`, which turns them into the config:

    --guidance_scale=W      classifier-free guidance v_null + W (v_cond - v_null); 1 (default) the
                            conditional field, 0 the unconditional one
    --label=K               every sample with label K (default: class-balanced labels)

Defining the flags is the only thing importing this module does.
"""

from __future__ import annotations

from absl import flags

from cfm.cli.flag_defs import define, from_flags
from cfm.config import GuidanceConfig

define(GuidanceConfig, "guidance_scale", "Conditional checkpoints: classifier-free guidance scale w of "
       "v_null + w (v_cond - v_null) (1: the conditional field, 0: the unconditional one; w other than 0 and 1 "
       "costs 2 network evaluations per step, counted in the NFE).")
define(GuidanceConfig, "label", "Conditional checkpoints: sample every image with this label (class, or cluster "
       "class * num_subclasses + sub); default: class-balanced labels.")


def guidance_config(flag_values=flags.FLAGS) -> GuidanceConfig:
    """The `GuidanceConfig` of the parsed flags."""
    return from_flags(GuidanceConfig, flag_values)
