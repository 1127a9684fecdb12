"""Moved to :mod:`llava_voco.inference` (shared by the chat CLI and the eval entry); these names are
re-exported for importers not yet updated, and the module goes once none is left."""

from ..inference import (  # noqa: F401
    ImageChat,
    count_vision_passes,
    first_human_turn,
    image_tokens_per_frame,
    load_images,
    load_model,
    prompt_for_reply,
    stock_llava_inputs,
)
