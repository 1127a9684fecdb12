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


def test_one_processor_serves_concurrent_calls(voco_dir, digit_images):
    """The processor keeps no per-call state on the instance: calls from two threads (an image in one, a
    video in the other, whose frames get other token counts under LLaMA-VID) give what sequential calls give."""
    import sys
    import threading

    processor = VoCoLlavaProcessor.from_pretrained(voco_dir, voco_tokens=1)
    processor.mm_projector_type = "llamavid"
    processor.llamavid_compress_type, processor.llamavid_video_compress_type = "grid:2", "mean"
    calls = {
        "image": {"images": [digit_images[0]], "text": "USER: <image>\nWhich digit? ASSISTANT:"},
        "video": {"videos": [digit_images[1:4]], "text": "USER: <video>\nWhich frame? ASSISTANT:"},
    }
    expected = {name: processor(**call)["input_ids"] for name, call in calls.items()}
    image_block = 1 + 4 + 1  # context + grid:2 content + VoCo
    frame_block = 1 + 1 + 1  # context + mean content + VoCo
    ids = expected["video"][0]
    assert sum(1 for t in ids if t in (processor.image_token_id, processor.voco_token_id)) == 3 * frame_block
    ids = expected["image"][0]
    assert sum(1 for t in ids if t in (processor.image_token_id, processor.voco_token_id)) == image_block

    failures, start = [], threading.Barrier(2)

    def run(name):
        start.wait()
        for _ in range(60):
            try:
                got = processor(**calls[name])["input_ids"]
            except Exception as error:  # a call that read the other thread's images
                failures.append(f"{name}: {error!r}")
                return
            if got != expected[name]:
                failures.append(f"{name}: different tokens")
                return

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=run, args=(name,)) for name in calls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not failures, failures
