"""VoCoLlavaProcessor: the parent's expansion plus k <voco> tokens after each image."""

import pytest
from transformers import LlavaProcessor

from llava_voco import VoCoLlavaProcessor

from conftest import prompt

# Golden: what the tiny tokenizer gives for this prompt, image of 16 tokens, k=2.
GOLDEN_TOKENS = (
    ["<s>", "▁USER:", "▁"] + ["<image>"] * 16 + ["<voco>", "<voco>"]
    + ["▁", "\n", "Wh", "at", "▁is", "▁the", "▁sum", "?", "▁ASS", "ISTAN", "T:"]
)


def test_golden_tokens(voco_dir, digit_images):
    processor = VoCoLlavaProcessor.from_pretrained(voco_dir, voco_tokens=2)
    batch = processor(images=digit_images[0], text="USER: <image>\nWhat is the sum? ASSISTANT:")
    assert processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0]) == GOLDEN_TOKENS


@pytest.mark.parametrize("k", [0, 1, 3])
def test_parent_expansion_plus_voco(voco_dir, digit_images, k):
    parent = LlavaProcessor.from_pretrained(voco_dir)
    processor = VoCoLlavaProcessor.from_pretrained(voco_dir, voco_tokens=k)
    texts = [prompt(processor, "Which digit is at the top left?", 2), prompt(processor, "Describe.", 0)]
    images = digit_images[:2]
    ours = processor(images=images, text=texts, padding=True)["input_ids"]
    theirs = parent(images=images, text=texts, padding=True)["input_ids"]
    if k == 0:
        assert ours == theirs
        return
    image_id, voco_id = processor.image_token_id, processor.voco_token_id
    for our_ids, their_ids in zip(ours, theirs):
        our_ids = [t for t in our_ids if t != processor.tokenizer.pad_token_id]
        their_ids = [t for t in their_ids if t != processor.tokenizer.pad_token_id]
        expected = []
        for i, token in enumerate(their_ids):
            expected.append(token)
            if token == image_id and (i + 1 == len(their_ids) or their_ids[i + 1] != image_id):
                expected.extend([voco_id] * k)
        assert our_ids == expected


def test_chat_template_and_tokenizer_without_voco(llava_dir, voco_dir):
    processor = VoCoLlavaProcessor.from_pretrained(voco_dir)
    text = prompt(processor, "What is the sum?")
    assert text.endswith("USER: <image>\nWhat is the sum? ASSISTANT:")
    parent = LlavaProcessor.from_pretrained(llava_dir)
    with pytest.raises(ValueError, match="no single token for '<voco>'"):
        VoCoLlavaProcessor(image_processor=parent.image_processor, tokenizer=parent.tokenizer, patch_size=4,
                           vision_feature_select_strategy="default", voco_tokens=1)
