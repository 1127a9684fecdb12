"""Elastic k (docs/design.md §2.7): one model, several VoCo counts. The layout reads each image's k from its
VoCo run; the caller picks k per call; the cache records it; a k the model was not trained for is refused
naming the set."""

import pytest
import torch

import llava_voco
from llava_voco import VoCoLayoutError, VoCoLlavaConfig, VoCoLlavaForConditionalGeneration, VoCoLlavaProcessor

from conftest import prompt

COUNTS = [1, 2, 4]


@pytest.fixture(scope="module")
def elastic_dir(llava_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("elastic")
    model, processor = llava_voco.add_voco_to_llava(llava_dir, voco_tokens=4)
    model.config.voco_train_tokens = COUNTS
    processor.voco_token_choices = COUNTS
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_saved_elastic_model_and_processor_keep_their_counts(elastic_dir):
    assert VoCoLlavaConfig.from_pretrained(elastic_dir).voco_token_counts == COUNTS
    assert VoCoLlavaProcessor.from_pretrained(elastic_dir).voco_token_choices == COUNTS


@pytest.mark.parametrize("k", COUNTS)
def test_compress_with_each_k(elastic_dir, digit_images, k):
    model = VoCoLlavaForConditionalGeneration.from_pretrained(elastic_dir).eval()
    processor = VoCoLlavaProcessor.from_pretrained(elastic_dir)
    text = prompt(processor, "Which digit is at the top left?")
    full = processor(images=digit_images[0], text=text, return_tensors="pt", voco_tokens=k)
    ids = full["input_ids"][0]
    assert int((ids == model.config.voco_token_id).sum()) == k
    cut = int((ids == model.config.voco_token_id).nonzero()[-1]) + 1
    head = {"input_ids": full["input_ids"][:, :cut], "pixel_values": full["pixel_values"]}
    cache = model.compress(**head, voco_tokens=k)
    vision = int((ids == model.config.image_token_id).sum())
    assert cache.voco_tokens == k
    assert cache.get_seq_length() == cut - vision  # prefix + k
    with torch.no_grad():
        expected = model(**full).logits[:, cut:]
        got = model(input_ids=full["input_ids"][:, cut:], past_key_values=cache).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_k_the_model_was_not_trained_for_is_refused(elastic_dir, voco_dir, digit_images):
    model = VoCoLlavaForConditionalGeneration.from_pretrained(elastic_dir).eval()
    processor = VoCoLlavaProcessor.from_pretrained(elastic_dir)
    text = prompt(processor, "Which digit?")
    with pytest.raises(ValueError, match=r"trained with VoCo counts \[1, 2, 4\]"):
        processor(images=digit_images[0], text=text, voco_tokens=3)
    with pytest.raises(ValueError, match=r"trained with VoCo counts \[1, 2, 4\]"):
        model.compress(**processor(images=digit_images[0], text=text, return_tensors="pt"), voco_tokens=3)
    # three VoCo tokens laid out by another processor: the model names its counts
    three = VoCoLlavaProcessor.from_pretrained(voco_dir, voco_tokens=3)
    batch = three(images=digit_images[0], text=text, return_tensors="pt")
    with pytest.raises(VoCoLayoutError, match=r"followed by 3 VoCo token\(s\), expected a number of the model's VoCo counts \[1, 2, 4\]"):
        model(**batch)
    # a model with one k still says exactly which
    single = VoCoLlavaForConditionalGeneration.from_pretrained(voco_dir).eval()
    with pytest.raises(VoCoLayoutError, match="expected exactly voco_tokens=1"):
        single(**batch)
