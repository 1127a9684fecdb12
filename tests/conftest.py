"""Shared fixtures: a tiny LLaVA checkpoint on disk (real tokenizer, CLIP tower, Llama) and real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import llava_voco
from llava_voco.demo.tiny import build_tiny_llava
from real_tokenizer import llama_tokenizer as fetch_llama_tokenizer


@pytest.fixture(scope="session")
def digit_images() -> list[Image.Image]:
    """Handwritten digits from scikit-learn (8x8, 0..16), as 16x16 RGB images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for pixels in digits.images[:32]:
        gray = np.kron(pixels / 16.0 * 255.0, np.ones((2, 2))).astype(np.uint8)
        images.append(Image.fromarray(np.stack([gray] * 3, axis=-1)))
    return images


@pytest.fixture(scope="session")
def llama_tokenizer():
    """The real 32,000-token LLaMA-family tokenizer (fetched once with npm, cached under .cache/fixtures)."""
    return fetch_llama_tokenizer()


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    """A plain LlavaForConditionalGeneration checkpoint with its processor."""
    path = tmp_path_factory.mktemp("tiny_llava")
    build_tiny_llava(path, seed=0)
    return path


@pytest.fixture(scope="session")
def voco_dir(llava_dir, tmp_path_factory):
    """The same checkpoint with VoCo added (k=1)."""
    path = tmp_path_factory.mktemp("tiny_voco")
    llava_voco.add_voco_to_llava(llava_dir, voco_tokens=1, output_dir=path)
    return path


def load_voco(path, attn_implementation="sdpa", **config_overrides):
    model = llava_voco.VoCoLlavaForConditionalGeneration.from_pretrained(
        path, attn_implementation=attn_implementation, **config_overrides
    ).eval()
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(path)
    return model, processor


def prompt(processor, question: str, images: int = 1, answer: str | None = None) -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return processor.apply_chat_template(messages, add_generation_prompt=answer is None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Chat markers that the real tokenizers of LLaVA's templates have as single special tokens.
CHAT_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture
def chat_processor(voco_dir):
    """The VoCo processor with k=2 whose tokenizer also knows the chat templates' special tokens
    (ids beyond the tiny model's vocabulary: for tokenisation tests, not for a forward pass)."""
    from transformers import AddedToken

    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(voco_dir, voco_tokens=2)
    processor.tokenizer.add_tokens(
        [AddedToken(token, special=True, normalized=False) for token in CHAT_SPECIAL_TOKENS], special_tokens=True
    )
    return processor


@pytest.fixture
def image_folder(tmp_path, digit_images):
    """Digits saved as PNG files digit0.png ... digit7.png in a fresh folder."""
    folder = tmp_path / "images"
    folder.mkdir()
    for number, image in enumerate(digit_images[:8]):
        image.save(folder / f"digit{number}.png")
    return folder
