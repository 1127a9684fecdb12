"""Strings and values that more than one part of the package must agree on, defined once.

Token *ids* are never constants: they come from the tokenizer (``tokenizer.convert_tokens_to_ids``) or
the model config (``config.image_token_id``, ``config.voco_token_id``).
"""

IMAGE_PLACEHOLDER = "<image>"  # LLaVA's placeholder in data and prompts; also Llava's image token
VIDEO_PLACEHOLDER = "<video>"  # a video's placeholder; its frames become consecutive images
VOCO_TOKEN = "<voco>"  # the VoCo token added to the tokenizer as a special token
IGNORE_INDEX = -100  # labels the loss skips (torch's cross_entropy default ignore_index)
TEXT_DECODER_TOKENIZER_DIR = "text_decoder_tokenizer"  # LLaMA-VID's BERT tokenizer, beside the processor

__all__ = ["IGNORE_INDEX", "IMAGE_PLACEHOLDER", "TEXT_DECODER_TOKENIZER_DIR", "VIDEO_PLACEHOLDER", "VOCO_TOKEN"]
