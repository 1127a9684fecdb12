"""Adding VoCo to a plain LLaVA checkpoint, and round trips through the Auto classes."""

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

import llava_voco
from llava_voco import VoCoLlavaForConditionalGeneration, VoCoLlavaProcessor

from conftest import prompt


def test_add_voco_to_llava(llava_dir, tmp_path, digit_images):
    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    old_vocab = len(LlavaProcessor.from_pretrained(llava_dir).tokenizer)
    model, processor = llava_voco.add_voco_to_llava(llava_dir, voco_tokens=2, output_dir=tmp_path)

    tokenizer = processor.tokenizer
    voco_id = tokenizer.convert_tokens_to_ids("<voco>")
    assert voco_id == old_vocab and len(tokenizer) == old_vocab + 1
    assert "<voco>" in tokenizer.all_special_tokens
    assert model.config.voco_token_id == voco_id and model.config.voco_tokens == 2
    assert model.config.text_config.vocab_size == old_vocab + 1

    for new, old in ((model.get_input_embeddings(), llava.get_input_embeddings()),
                     (model.get_output_embeddings(), llava.get_output_embeddings())):
        assert new.weight.shape[0] == old.weight.shape[0] + 1
        assert torch.equal(new.weight[:old_vocab], old.weight[:old_vocab])
        torch.testing.assert_close(new.weight[voco_id], old.weight[:old_vocab].mean(0), atol=0, rtol=0)
    old_state = llava.state_dict()
    for name, tensor in model.state_dict().items():
        if "embed_tokens" not in name and "lm_head" not in name:
            assert torch.equal(tensor, old_state[name]), name

    # Auto classes load our classes back, with identical logits.
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    reprocessor = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is VoCoLlavaForConditionalGeneration
    assert type(reprocessor) is VoCoLlavaProcessor and reprocessor.voco_tokens == 2
    batch = reprocessor(images=digit_images[:2], text=[prompt(reprocessor, "What is the sum?")] * 2,
                        return_tensors="pt")
    assert int((batch["input_ids"] == voco_id).sum()) == 4
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)

    # Weights are safetensors with Llava's on-disk key names.
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "voco_llava" and saved["voco_tokens"] == 2
    llava_keys = set(load_file(llava_dir / "model.safetensors"))
    assert set(load_file(tmp_path / "model.safetensors")) == llava_keys


def test_voco_tokens_zero_saves_a_plain_llava_checkpoint(voco_dir, tmp_path, digit_images):
    """A model saved with voco_tokens=0 is a plain Llava checkpoint (docs/design.md §4)."""
    model = VoCoLlavaForConditionalGeneration.from_pretrained(voco_dir, voco_tokens=0).eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llava"
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    processor = VoCoLlavaProcessor.from_pretrained(voco_dir, voco_tokens=0)
    batch = processor(images=digit_images[0], text=prompt(processor, "What?"), return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, llava(**batch).logits)


def test_add_voco_script(llava_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "add_voco_to_llava.py"
    result = subprocess.run(
        [sys.executable, str(script), "--model-path", str(llava_dir), "--voco-tokens", "4", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, check=True,
    )
    assert "voco_tokens=4" in result.stdout
    assert AutoModelForImageTextToText.from_pretrained(tmp_path).config.voco_tokens == 4


def test_plain_llava_checkpoint_loads_into_our_classes(llava_dir):
    """from_pretrained(<plain Llava dir>) gets every weight (transformers applies Llava's key mapping to
    our classes too), for the full model and for the base model."""

    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    ours = VoCoLlavaForConditionalGeneration.from_pretrained(llava_dir)
    for name, tensor in llava.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    base = llava_voco.VoCoLlavaModel.from_pretrained(llava_dir)
    for name, tensor in llava.model.state_dict().items():
        assert torch.equal(base.state_dict()[name], tensor), name


def test_add_special_tokens_with_mean_rows(llava_dir):
    """The one way new tokens get rows (add_voco_to_llava and the training entry): new ones at the mean of the
    rows the tokenizer had, in the embedding and an untied lm_head; tokens already there keep theirs."""
    from llava_voco.model.builder import add_special_tokens_with_mean_rows

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    tokenizer = LlavaProcessor.from_pretrained(llava_dir).tokenizer
    known = len(tokenizer)
    before = {name: model.get_parameter(name).detach().clone()
              for name in ("model.language_model.embed_tokens.weight", "lm_head.weight")}
    assert not model.config.tie_word_embeddings
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids = add_special_tokens_with_mean_rows(tokenizer, model, ["<image>", "<a>", "<b>"])
    assert ids == [image_id, known, known + 1] and len(tokenizer) == known + 2
    assert {"<a>", "<b>"} <= set(tokenizer.all_special_tokens)
    for name, old in before.items():
        new = model.get_parameter(name)
        assert new.shape[0] == known + 2
        assert torch.equal(new[:known], old[:known])  # <image> included: it was there
        for token_id in ids[1:]:
            torch.testing.assert_close(new[token_id], old[:known].mean(0), atol=0, rtol=0)
    # Already there: nothing changes.
    assert add_special_tokens_with_mean_rows(tokenizer, model, ["<a>"]) == [known] and len(tokenizer) == known + 2
