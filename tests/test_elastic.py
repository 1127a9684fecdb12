"""Elastic k (docs/design.md §2.7): one model, several VoCo counts. The layout reads each image's k from its
VoCo run; the caller picks k per call; the cache records it; a k the model was not trained for is refused
naming the set."""

import json

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


def test_eval_and_chat_take_voco_tokens(elastic_dir, digit_images, tmp_path):
    """``--voco-tokens k`` in the eval entry and the chat CLI (subprocesses, as a user runs them): each k's
    answers are greedy decoding of the prompt laid out with k VoCo tokens; the chat's cache holds k; the cache
    store keeps one entry per k; a k outside the set is one line naming it, before any weight is read."""
    from test_serve_eval import ENV, run

    import subprocess
    import sys

    digit_images[0].save(tmp_path / "0.png")
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"question_id": "q0", "image": "0.png", "text": "Which digit?"}) + "\n")
    model = VoCoLlavaForConditionalGeneration.from_pretrained(elastic_dir).eval()
    processor = VoCoLlavaProcessor.from_pretrained(elastic_dir)
    for k in COUNTS:
        answers = tmp_path / f"answers_k{k}.jsonl"
        run("llava_voco.eval.model_vqa", "--model-path", elastic_dir, "--question-file", questions, "--image-folder",
            tmp_path, "--answers-file", answers, "--max-new-tokens", "4", "--voco-tokens", k)
        record = json.loads(answers.read_text())
        assert record["metadata"] == {"voco_tokens": k}
        full = processor(images=digit_images[0], text=record["prompt"], return_tensors="pt", voco_tokens=k)
        expected = model.generate(**full, max_new_tokens=4, do_sample=False)[0, full["input_ids"].shape[1]:]
        assert record["text"] == processor.tokenizer.decode(expected, skip_special_tokens=True).strip()

        out = run("llava_voco.serve.cli", "--model-path", elastic_dir, "--image-file", tmp_path / "0.png",
                  "--temperature", "0", "--max-new-tokens", "2", "--voco-tokens", k, "--cache-dir", tmp_path / "store",
                  stdin="Which digit?\n")
        assert f"16 vision tokens -> {k} VoCo token(s), compression ratio {16 // k}x" in out
    assert len(list((tmp_path / "store").glob("*/*.voco.safetensors"))) == len(COUNTS)

    refused = subprocess.run([sys.executable, "-m", "llava_voco.serve.cli", "--model-path", str(elastic_dir),
                              "--image-file", str(tmp_path / "0.png"), "--voco-tokens", "3"],
                             capture_output=True, text=True, env=ENV, timeout=120)
    assert refused.returncode != 0
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "--voco-tokens 3" in lines[0] and "trained with VoCo counts [1, 2, 4]" in lines[0], lines
