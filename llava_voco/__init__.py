"""Vision-token compression (VoCo-LLaMA, LLaMA-VID) for LLaVA models on Hugging Face transformers.

Importing the package registers ``voco_llava`` with the Auto classes, so
``AutoModelForImageTextToText.from_pretrained`` and ``AutoProcessor.from_pretrained`` load our checkpoints.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from .model import (
    MASK_MODES,
    VOCO_TOKEN,
    VoCoCache,
    VoCoCacheError,
    VoCoLayout,
    VoCoLayoutError,
    VoCoLlavaConfig,
    VoCoLlavaForConditionalGeneration,
    VoCoLlavaModel,
    VoCoLlavaProcessor,
    model_fingerprint,
)
from .model.builder import add_voco_to_llava

__version__ = "0.1.0"

AutoConfig.register(VoCoLlavaConfig.model_type, VoCoLlavaConfig, exist_ok=True)
AutoModel.register(VoCoLlavaConfig, VoCoLlavaModel, exist_ok=True)
AutoModelForImageTextToText.register(VoCoLlavaConfig, VoCoLlavaForConditionalGeneration, exist_ok=True)
AutoProcessor.register(VoCoLlavaConfig, VoCoLlavaProcessor, exist_ok=True)
# Checkpoints keep Llava's on-disk key layout, so Llava and VoCo state dicts load into each other. By class
# name as well as model type: a config read from a plain Llava checkpoint still says model_type "llava",
# whose mapping transformers does not apply to classes outside the library.
for _name, _source in (
    (VoCoLlavaConfig.model_type, "llava"),
    (VoCoLlavaForConditionalGeneration.__name__, "llava"),
    (VoCoLlavaModel.__name__, "LlavaModel"),
):
    register_checkpoint_conversion_mapping(_name, get_checkpoint_conversion_mapping(_source), overwrite=True)

__all__ = [
    "VoCoCache",
    "VoCoCacheError",
    "MASK_MODES",
    "VOCO_TOKEN",
    "VoCoLayout",
    "VoCoLayoutError",
    "VoCoLlavaConfig",
    "VoCoLlavaForConditionalGeneration",
    "VoCoLlavaModel",
    "VoCoLlavaProcessor",
    "add_voco_to_llava",
    "model_fingerprint",
]
