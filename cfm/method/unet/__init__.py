"""The ADM UNet used as the flow-matching vector field (see unet/unet.py)."""

from cfm.method.unet.unet import PAPER_CONFIG, UNetModel, check_config, normalize_config, strip_state_dict_prefixes

__all__ = ["PAPER_CONFIG", "UNetModel", "check_config", "normalize_config", "strip_state_dict_prefixes"]
