"""Checkpoints in LLaVA's own format (``llava_llama`` / ``llava_mistral``, written by LLaVA v1.2.2's code:
tests/fixtures/parity/llava/, made by scripts/parity/llava_fixture.py, recipe in tests/fixtures/parity/README.md)
converted into our classes give LLaVA's logits; the script and the loading entry points take them."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_voco import VoCoLlavaForConditionalGeneration
from llava_voco.model.llava_original import LlavaCheckpointError, convert_llava_original, llava_ids

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "parity" / "llava"
TOWER = FIXTURES / "vision_tower"
TOLERANCE = 1e-5
LLAVA_IMAGE_INDEX = -200  # LLaVA's IMAGE_TOKEN_INDEX
TOKENS_PER_IMAGE = 4


def compare(model: VoCoLlavaForConditionalGeneration, folder: Path) -> float:
    """Max |logit difference| against LLaVA's over its vocabulary and the real positions."""
    cases = load_file(str(folder / "cases.safetensors"))
    input_ids, attention_mask = llava_ids(cases["input_ids"], cases["attention_mask"], image_index=LLAVA_IMAGE_INDEX,
                                          image_token_id=model.config.image_token_id,
                                          tokens_per_image=TOKENS_PER_IMAGE, padding_side="right")
    assert torch.equal(attention_mask, cases["embed_attention_mask"])
    with_image = (cases["input_ids"] == LLAVA_IMAGE_INDEX).any(1)  # LLaVA reads a dummy image for text-only rows
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       pixel_values=cases["pixel_values"][with_image]).logits
    vocab = cases["logits"].shape[-1]
    return float((logits[..., :vocab] - cases["logits"]).abs()[attention_mask.bool()].max())


@pytest.mark.parametrize("name", ["llava_llama", "llava_mistral"])
def test_converted_checkpoint_gives_llava_s_logits(name):
    # llava_llama names its tower by Hub name (not saved, as LLaVA's releases): the tower's folder is given;
    # llava_mistral carries the tower's weights and names its folder by a relative path
    model = convert_llava_original(FIXTURES / name, vision_tower=TOWER if name == "llava_llama" else None)
    assert compare(model, FIXTURES / name) < TOLERANCE


def test_a_tower_by_hub_name_is_refused_in_one_line():
    with pytest.raises(LlavaCheckpointError, match=r"mm_vision_tower='openai/clip-vit-large-patch14-336' is not a "
                                                   r"local folder .*pass the CLIP tower's folder \(--vision-tower PATH\)"):
        convert_llava_original(FIXTURES / "llava_llama")


def convert_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_llava_checkpoint", ROOT / "scripts" / "convert_llava_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_script_writes_a_checkpoint_from_pretrained_loads(tmp_path, capsys):
    main = convert_script()
    output = tmp_path / "converted"
    assert main([str(FIXTURES / "llava_llama"), str(output), "--vision-tower", str(TOWER)]) == 0
    model = VoCoLlavaForConditionalGeneration.from_pretrained(output).eval()
    assert model.config.voco_tokens == 0  # no <voco> in the checkpoint: plain LLaVA
    assert compare(model, FIXTURES / "llava_llama") < TOLERANCE

    capsys.readouterr()
    assert main([str(FIXTURES / "llava_llama"), str(tmp_path / "again")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ") and "--vision-tower PATH" in error


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer whose ids are the fixture's: 0 <unk>, 1 <s>, 2 </s>, then w3 ... (LLaVA's has
    exactly the model's rows; ``<image>`` is not among them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_load_model_converts_on_the_fly(tmp_path):
    """chat / model_vqa / serve's loader takes LLaVA's folder as it is: model and processor, LLaVA's logits."""
    import shutil

    from llava_voco.inference import load_model

    shutil.copytree(FIXTURES, tmp_path / "llava")
    folder = tmp_path / "llava" / "llava_mistral"  # mm_vision_tower: ../vision_tower
    cases = load_file(str(folder / "cases.safetensors"))
    word_tokenizer(cases["logits"].shape[-1]).save_pretrained(folder)
    model, processor = load_model(str(folder))
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    row = cases["input_ids"][0][cases["attention_mask"][0].bool()].tolist()  # <s> w7 <image> w.. (no </s>)
    text = " ".join("<image>" if token == LLAVA_IMAGE_INDEX else f"w{token}" for token in row[1:])
    pixels = cases["pixel_values"][0].permute(1, 2, 0)
    image = ((pixels - pixels.min()) / (pixels.max() - pixels.min()) * 255).round().to(torch.uint8).numpy()
    inputs = processor(images=[image], text=text, return_tensors="pt")
    expected_ids, _ = llava_ids(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long),
                                image_index=LLAVA_IMAGE_INDEX, image_token_id=model.config.image_token_id,
                                tokens_per_image=TOKENS_PER_IMAGE)
    assert inputs.input_ids.tolist() == expected_ids.tolist()
    with torch.no_grad():  # LLaVA's pixels (the image processor's output of this image is another tensor)
        logits = model(input_ids=inputs.input_ids, pixel_values=cases["pixel_values"][:1]).logits
    vocab = cases["logits"].shape[-1]
    assert float((logits[0, :, :vocab] - cases["logits"][0, : logits.shape[1]]).abs().max()) < TOLERANCE


def test_train_entry_names_the_conversion(tmp_path):
    from llava_voco.train.arguments import TrainConfigError
    from llava_voco.train.plan import read_config

    with pytest.raises(TrainConfigError, match=r"LLaVA's own format .*convert_llava_checkpoint\.py"):
        read_config("--model_name_or_path", str(FIXTURES / "llava_llama"))
