"""maskdiffusion: open-vocabulary semantic segmentation from a frozen text-to-image diffusion model.

>>> from maskdiffusion import MaskDiffusion
>>> seg = MaskDiffusion.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
>>> result = seg("street.jpg", classes=["road", "traffic light", "car", "sky"])
"""

from .loading import DEFAULT_MODEL, ModelNotFoundError, ModelTooLargeError
from .mask_head import mask_head
from .pipeline import MaskDiffusion, SegmentationCancelled
from .presets import PRESETS, Preset
from .prompts import VocabularyError
from .result import Result
from .views import ImageLoadError, InputLimits, load_image

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "PRESETS",
    "ImageLoadError",
    "InputLimits",
    "MaskDiffusion",
    "ModelNotFoundError",
    "ModelTooLargeError",
    "Preset",
    "Result",
    "SegmentationCancelled",
    "VocabularyError",
    "__version__",
    "load_image",
    "mask_head",
]
