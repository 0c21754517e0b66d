"""The published ``unet`` package (TorchCFM): the published import surface of the UNet.

``from unet import UNetModelWrapper`` and ``from unet.unet import UNetModelWrapper`` both work.
Where the names live:

    UNetModelWrapper   unet/unet.py, a thin subclass of the library's UNet
    UNetModel          cfm.method.unet.UNetModel (the ADM UNet, published module names)
"""

from unet.unet import UNetModel, UNetModelWrapper

__all__ = ["UNetModel", "UNetModelWrapper"]
