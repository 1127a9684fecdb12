"""README's quick start on a tiny model made on the spot (``scripts/make_tiny_llava.py``), and what
``pip install`` ships: no test fixtures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import llava_voco

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_start_on_a_tiny_model(tmp_path, capsys):
    """make the tiny model, add VoCo, compress an image, answer from the cache: the answer equals the
    uncompressed prompt's under the VoCo mask (greedy), and the cache holds the prefix and one <voco>."""
    make_tiny_llava = load_script("make_tiny_llava")
    assert make_tiny_llava.main([str(tmp_path / "tiny-llava")]) == 0
    assert "16 image tokens per 16x16 image" in capsys.readouterr().out
    assert make_tiny_llava.main([str(tmp_path / "tiny-llava")]) == 1  # never over a checkpoint
    load_script("add_voco_to_llava").main(["--model-path", str(tmp_path / "tiny-llava"), "--voco-tokens", "1",
                                           "--output-dir", str(tmp_path / "tiny-voco")])

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "tiny-voco").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "tiny-voco")
    assert isinstance(model, llava_voco.VoCoLlavaForConditionalGeneration)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    head, question = prompt.split("<image>")
    image = Image.new("RGB", (16, 16), "white")
    cache = model.compress(**processor(images=image, text=head + "<image>", return_tensors="pt"))
    prefix = len(processor.tokenizer(head)["input_ids"])
    assert cache.get_seq_length() == prefix + 1
    question_ids = processor.tokenizer(question, add_special_tokens=False, return_tensors="pt")
    answer = model.generate(**question_ids, past_key_values=cache, max_new_tokens=4, do_sample=False)
    whole = processor(images=image, text=prompt, return_tensors="pt")
    full = model.generate(**whole, max_new_tokens=4, do_sample=False)  # the whole prompt, under the VoCo mask
    assert torch.equal(answer[0, question_ids["input_ids"].shape[1]:], full[0, whole["input_ids"].shape[1]:])


def test_the_package_ships_no_test_fixtures():
    """``pip install`` ships ``llava_voco/``: nothing there fetches the test tokenizer (npm) or is a fixture module."""
    package = Path(llava_voco.__file__).parent
    assert not (package / "fixtures.py").exists()
    fetching = [str(p.relative_to(package)) for p in package.rglob("*.py") if "npm" in p.read_text()]
    assert fetching == []
