from .configuration_voco_llava import VoCoLlavaConfig
from .modeling_voco_llava import VoCoLlavaForConditionalGeneration, VoCoLlavaModel
from .voco_cache import VoCoCache, VoCoCacheError, model_fingerprint
from .processing_voco_llava import VOCO_TOKEN, VoCoLlavaProcessor
from .voco_mask import MASK_MODES, VoCoLayout, VoCoLayoutError

__all__ = [
    "VoCoCache",
    "VoCoCacheError",
    "model_fingerprint",
    "MASK_MODES",
    "VOCO_TOKEN",
    "VoCoLayout",
    "VoCoLayoutError",
    "VoCoLlavaConfig",
    "VoCoLlavaForConditionalGeneration",
    "VoCoLlavaModel",
    "VoCoLlavaProcessor",
]
