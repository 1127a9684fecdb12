"""Ways an image becomes the LLM's tokens, one module each, named by ``mm_projector_type``:

- ``llava.py``: ``linear`` and ``mlp2x_gelu`` (LLaVA's projectors), optionally after average pooling
  (``vision_token_pooling``, ``pooled.py``);
- ``llamavid.py``: ``llamavid`` (a text-guided context token plus pooled content tokens);
- ``pooled.py``: the pooling specs both use.

(Precomputed frame features are not a method: they replace the vision tower's patch features for any of
them, ``image_inputs.patch_features``.) ``base.py`` holds the interface and the registry; a new method is a
subclass of ``ImageProjector`` and one ``register_projector(name, cls)`` call, from anywhere.
"""

from .base import (
    ImageProjector,
    get_projector,
    projector_for,
    projector_input_size,
    projector_names,
    register_projector,
)
from .llamavid import LlamaVidMethod
from .llava import LinearPatchProjector, LinearProjector, MlpGeluProjector, llava_projector_state_dict
from .pooled import CompressTypeError, content_tokens_per_frame, parse_compress_type, pool_patches

register_projector("linear", LinearPatchProjector)
register_projector("mlp2x_gelu", MlpGeluProjector)
register_projector("llamavid", LlamaVidMethod)

__all__ = [
    "CompressTypeError",
    "ImageProjector",
    "LinearProjector",
    "content_tokens_per_frame",
    "get_projector",
    "llava_projector_state_dict",
    "parse_compress_type",
    "pool_patches",
    "projector_for",
    "projector_input_size",
    "projector_names",
    "register_projector",
]
