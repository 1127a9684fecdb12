"""LLaVA-1.5-7B's real structure where it matters, small where it does not, through the public entries.

Real: the 32,000-token LLaMA-family tokenizer (the ``llama_tokenizer`` fixture) with ``<image>`` at 32,000 and an
embedding padded to 32,064 rows as llava-hf's, the ``v1`` template, CLIP ViT-L/14 geometry at 336 px (patch 14,
577 positions with CLS, 576 vision tokens from layer -2), LLaMA's multi-head attention, the ``mlp2x_gelu``
projector, a checkpoint saved in fp16 as llava-hf's are. Small: 2 vision layers of width 64, 2 LLM layers of
width 64 (2 heads of 32); one training sample (a bf16 step on a CPU without bf16 matrix units is slow: the
backward of the 32,064-row lm_head over ~620 positions dominates). Then: ``add_voco_to_llava``, the training entry with ``--bf16 True``,
``model.compress`` of a 336 px image, an answer from the cache against the full masked forward, and the eval
entry on two questions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers import LlavaProcessor

import llava_voco
from llava_voco.demo.tiny import LLAVA_V1_CHAT_TEMPLATE
from llava_voco.train.train import main

IMAGE_SIZE, PATCH = 336, 14
VISION_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 576
LLM = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2}
WORDS = "zero one two three four five six seven eight nine".split()


def digit_image(index: int) -> tuple[Image.Image, int]:
    """A handwritten digit (scikit-learn, 8 x 8) scaled to 336 x 336 RGB, and its label."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.kron(digits.images[index] / 16.0 * 255.0, np.ones((42, 42))).astype(np.uint8)
    return Image.fromarray(np.stack([gray] * 3, axis=-1)), int(digits.target[index])


@pytest.fixture(scope="module")
def llava_15(llama_tokenizer, tmp_path_factory):
    """A LlavaForConditionalGeneration with LLaVA-1.5-7B's structure at small width, saved in fp16."""
    path = tmp_path_factory.mktemp("llava15") / "llava"
    tokenizer = llama_tokenizer
    assert len(tokenizer) == 32001 and tokenizer.convert_tokens_to_ids("<image>") == 32000
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=64, hidden_act="quick_gelu")
    text = LlamaConfig(**LLM, intermediate_size=128, vocab_size=32064, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=VISION_TOKENS,
                         vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).to(torch.float16).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=LLAVA_V1_CHAT_TEMPLATE).save_pretrained(path)
    return path


def test_llava_15_shapes_through_the_public_entries(llava_15, tmp_path):
    # add_voco_to_llava: the checkpoint as saved (fp16), <voco> added at 32,001, inside the padded embedding
    voco_dir = tmp_path / "voco"
    model, processor = llava_voco.add_voco_to_llava(llava_15, voco_tokens=1, output_dir=voco_dir)
    assert model.dtype == torch.float16 and model.config.voco_token_id == 32001
    assert model.get_input_embeddings().weight.shape[0] == 32064  # no resize: the row existed

    # the training entry, --bf16 True: one 336 px digit, seen at every step
    images = tmp_path / "images"
    images.mkdir()
    samples = []
    for index in range(2):
        image, label = digit_image(index)
        image.save(images / f"{index}.png")
        samples.append({"id": str(index), "image": f"{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": WORDS[label]}]})
    (tmp_path / "train.json").write_text(json.dumps(samples[:1]))
    out = tmp_path / "out"
    trainer = main([str(a) for a in [
        "--model_name_or_path", voco_dir, "--version", "v1", "--data_path", tmp_path / "train.json",
        "--image_folder", images, "--image_aspect_ratio", "pad", "--bf16", "True", "--model_max_length", "2048",
        "--output_dir", out, "--per_device_train_batch_size", "1", "--max_steps", "4", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--save_strategy", "no", "--use_cpu", "True", "--report_to", "none", "--seed", "0",
        "--dataloader_num_workers", "0"]])
    curve = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(curve) == 4 and all(math.isfinite(loss) for loss in curve) and curve[-1] < curve[0] - 0.5, curve
    batch = next(iter(trainer.get_train_dataloader()))
    assert int((batch["input_ids"][0] == 32000).sum()) == VISION_TOKENS and int((batch["input_ids"][0] == 32001).sum()) == 1
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        assert {str(handle.get_slice(key).get_dtype()) for key in handle.keys()} == {"BF16"}

    # compress a 336 px image: the cache keeps prefix + k positions of each layer's keys and values
    model = llava_voco.VoCoLlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    image, _ = digit_image(7)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    full_text = processor.apply_chat_template(messages, add_generation_prompt=True)
    cut = full_text.index("<image>") + len("<image>")
    full = processor(images=image, text=full_text, return_tensors="pt")
    head = processor(images=image, text=full_text[:cut], return_tensors="pt")
    length = head.input_ids.shape[1]
    assert torch.equal(full.input_ids[:, :length], head.input_ids)
    prefix = int((head.input_ids[0] == 32000).nonzero()[0])
    assert length == prefix + VISION_TOKENS + 1
    cache = model.compress(**head)
    assert cache.get_seq_length() == prefix + 1
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    expected_bytes = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * (prefix + 1) * 2
    assert sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) == expected_bytes

    # the answer from the cache is the full masked forward's (bf16: within bf16 rounding of the logits)
    question = {"input_ids": full.input_ids[:, length:], "attention_mask": full.attention_mask[:, length:]}
    with torch.no_grad():
        reference = model(**full).logits[:, length:].float()
        from_cache = model(**question, past_key_values=cache.clone()).logits.float()
    torch.testing.assert_close(from_cache, reference, atol=0.05 * reference.abs().max().item(), rtol=0)
    assert torch.equal(from_cache[:, -1].argmax(-1), reference[:, -1].argmax(-1))

    # the eval entry, two questions
    from llava_voco.eval.model_vqa import main as model_vqa

    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "image": f"{i}.png", "text": "What is in the image?"})
                                 + "\n" for i in range(2)))
    model_vqa(["--model-path", str(out), "--question-file", str(questions), "--image-folder", str(images),
               "--answers-file", str(tmp_path / "answers.jsonl"), "--max-new-tokens", "4"])
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert sorted(a["question_id"] for a in answers) == [0, 1] and all(isinstance(a["text"], str) for a in answers)
