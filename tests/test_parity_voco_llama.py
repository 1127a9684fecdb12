"""Parity with the released VoCo-LLaMA code (github.com/Yxxxb/VoCo-LLaMA at 3b6e14d, transformers 4.37.2 with its
overwritten ``modeling_attn_mask_utils.py``): the fixture in tests/fixtures/parity/voco_llama/ was made by that
code (scripts/parity/voco_llama_fixture.py, recipe in tests/fixtures/parity/README.md) on the layout it builds,
``<s> <image> \\n <voco><voco> \\n`` + prompt, left padded; here the same checkpoint, converted from LLaVA's
layout, runs in ``voco_mask_mode="official"`` on every backend and through the compressed cache."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_voco import VoCoLayout, VoCoLayoutError
from llava_voco.model.llava_original import convert_llava_original, llava_ids

from test_train import tiny  # noqa: F401

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "parity" / "voco_llama"
TOLERANCE = 1e-4  # issue 27; measured: 3.5e-6 (sdpa)
RELEASED_VOCO_ID, RELEASED_IMAGE_INDEX = 32000, -200  # the released code's literals
TOKENS_PER_IMAGE = 4  # the fixture's 16 px tower, 8 px patches
VOCO_TOKENS = 2  # the released code's k


@pytest.fixture(scope="module")
def fixture():
    config = json.loads((FIXTURE / "config.json").read_text())
    cases = load_file(str(FIXTURE / "cases.safetensors"))
    return config, cases


def released_model(config, attn_implementation="sdpa", mode="official"):
    return convert_llava_original(FIXTURE, voco_tokens=VOCO_TOKENS, voco_token_id=config["voco_token_id"],
                                  voco_mask_mode=mode, attn_implementation=attn_implementation)


def our_inputs(model, config, cases):
    released_ids = cases["input_ids"].clone()
    released_ids[released_ids == RELEASED_VOCO_ID] = config["voco_token_id"]  # the compacted vocabulary's <voco>
    input_ids, attention_mask = llava_ids(released_ids, cases["attention_mask"], image_index=RELEASED_IMAGE_INDEX,
                                          image_token_id=model.config.image_token_id, tokens_per_image=TOKENS_PER_IMAGE)
    assert torch.equal(attention_mask, cases["embed_attention_mask"])  # the released code pads the same way
    return input_ids, attention_mask


def released_vocabulary(logits, config):
    return logits[..., : config["vocab_size"]]  # our last row is the appended <image> token


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager", "varlen_reference"])
def test_logits_equal_the_released_code_on_its_layout(fixture, attn_implementation):
    config, cases = fixture
    model = released_model(config, attn_implementation)
    input_ids, attention_mask = our_inputs(model, config, cases)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=cases["pixel_values"]).logits
    real = attention_mask.bool()  # padding queries: the released code lets them read everything, never used
    for rows in ("train_rows", "eval_rows"):
        chosen = cases[rows]
        difference = (released_vocabulary(logits, config)[chosen] - cases["logits"][chosen]).abs()[real[chosen]]
        assert float(difference.max()) < TOLERANCE, (rows, float(difference.max()))


def test_gap_tokens_are_the_image_s_and_paper_mode_refuses_them(fixture):
    config, cases = fixture
    model = released_model(config)
    input_ids, attention_mask = our_inputs(model, config, cases)
    layout = model.model.voco_layout(input_ids, attention_mask)
    row = input_ids[0]
    voco_positions = (row == config["voco_token_id"]).nonzero().flatten()
    image_positions = (row == model.config.image_token_id).nonzero().flatten()
    gap = torch.arange(int(image_positions[-1]) + 1, int(voco_positions[0]))
    assert len(gap) == 2  # "\n" between the image and its VoCo run: two tokens in LLaMA's tokenizer
    # the image's tokens and the gap are hidden after the last VoCo token; the text reads from the first one on
    assert (layout.key_visible_until[0, torch.cat([image_positions, gap])] == voco_positions[-1]).all()
    mask = layout.dense_mask(attention_mask)[0, 0]
    text = int(voco_positions[-1]) + 1
    assert not mask[text:, : int(voco_positions[0])].any()
    assert mask[voco_positions[0], gap].all()  # the VoCo tokens read the gap, as the released mask lets them
    with pytest.raises(VoCoLayoutError, match="only voco_mask_mode='official' accepts that"):
        VoCoLayout.from_input_ids(input_ids, attention_mask, image_token_id=model.config.image_token_id,
                                  voco_token_id=config["voco_token_id"], voco_tokens=VOCO_TOKENS, mode="paper")


def test_compressed_cache_answers_as_the_released_full_forward(fixture):
    """The eval prompt compressed to BOS + k positions (the gap and the image dropped), its text from the cache."""
    config, cases = fixture
    model = released_model(config)
    input_ids, attention_mask = our_inputs(model, config, cases)
    (row,) = cases["eval_rows"].tolist()
    real = attention_mask[row].bool()
    prompt = input_ids[row, real][None]
    head_length = int((prompt[0] == config["voco_token_id"]).nonzero().max()) + 1
    cache = model.compress(input_ids=prompt[:, :head_length], pixel_values=cases["pixel_values"][row:row + 1])
    assert cache.get_seq_length() == 1 + VOCO_TOKENS  # BOS + k: official mode keeps the prefix for later images
    with torch.no_grad():
        logits = model(input_ids=prompt[:, head_length:], past_key_values=cache).logits
    expected = cases["logits"][row, real][head_length:]
    difference = (released_vocabulary(logits[0], config) - expected).abs().max()
    assert float(difference) < TOLERANCE, float(difference)


def test_voco_official_template_lays_out_the_released_sequence(voco_dir, digit_images):
    """``voco_official`` + its processor layout: ``<s> <image>... \\n <voco>... \\n`` + prompt with the real
    tokenizer; official mode reads it, and compression keeps BOS + k and answers as the full forward."""
    from conftest import load_voco

    from llava_voco.conversation import HUMAN, get_template
    from llava_voco.inference import prompt_for_reply

    model, processor = load_voco(voco_dir, voco_mask_mode="official")
    template = get_template("voco_official")
    template.lay_out_voco(processor)
    text = prompt_for_reply(template, [(HUMAN, "What is the digit?\n<image>")], 1)
    assert text.startswith("<image>\n") and "\n" not in text[len("<image>\n"):]
    full = processor(images=digit_images[3], text=text, return_tensors="pt")
    tokenizer, ids = processor.tokenizer, full.input_ids[0]
    voco_positions = (ids == model.config.voco_token_id).nonzero().flatten()
    last_image = int((ids == model.config.image_token_id).nonzero().max())
    assert tokenizer.decode(ids[last_image + 1:voco_positions[0]]).strip(" ") == "\n"  # the released gap
    assert tokenizer.decode(ids[voco_positions[-1] + 1:]).startswith("\n")
    assert len(voco_positions) == model.config.voco_tokens

    head_length = int(voco_positions[-1]) + 1
    cache = model.compress(input_ids=full.input_ids[:, :head_length], pixel_values=full.pixel_values)
    assert cache.get_seq_length() == int((ids[:last_image] != model.config.image_token_id).sum()) + model.config.voco_tokens
    with torch.no_grad():
        reference = model(**full).logits[:, head_length:]
        from_cache = model(input_ids=full.input_ids[:, head_length:], past_key_values=cache).logits
    torch.testing.assert_close(from_cache, reference, atol=1e-5, rtol=0)


def test_the_training_entry_trains_the_released_layout(tiny, tmp_path):
    """``--version voco_official --voco_mask_mode official``: training samples in the released layout (the gap
    between each image and its VoCo run), the processor saved with it."""
    from test_train import common_args

    from llava_voco import VoCoLlavaProcessor
    from llava_voco.train.train import main

    trainer = main(["--model_name_or_path", str(tiny.llava), "--voco_tokens", "2", "--voco_mask_mode", "official"]
                   + common_args(tiny, tmp_path / "out", max_steps=1, version="voco_official"))
    config = trainer.model.config
    item = next(item for item in trainer.train_dataset if (item["input_ids"] == config.image_token_id).any())
    ids = item["input_ids"]
    last_image = int((ids == config.image_token_id).nonzero().max())
    first_voco = int((ids == config.voco_token_id).nonzero().min())
    assert first_voco > last_image + 1  # the gap ("\n") between the image and its VoCo run
    assert VoCoLlavaProcessor.from_pretrained(tmp_path / "out").voco_separator == "\n"


def test_the_engine_answers_in_the_released_layout_as_the_full_forward(voco_dir, digit_images):
    """``InferenceEngine`` with ``voco_official``: the processor lays out the gap, the answer from the compressed
    head is the greedy answer of the whole sequence."""
    from conftest import load_voco

    from llava_voco.engine import GenerationOptions, InferenceEngine

    model, processor = load_voco(voco_dir, voco_mask_mode="official")
    engine = InferenceEngine(model, processor, "voco_official")
    assert processor.voco_separator == "\n"
    prompt = engine.render([{"role": "user", "content": [{"type": "image", "image": digit_images[4]},
                                                         {"type": "text", "text": "What is the sum?"}]}])
    full = processor(images=[digit_images[4]], text=prompt.text, return_tensors="pt")
    ids = full.input_ids[0]
    assert int((ids == model.config.voco_token_id).nonzero().min()) > int((ids == model.config.image_token_id).nonzero().max()) + 1
    expected = model.generate(**full, max_new_tokens=5, do_sample=False)[0, full.input_ids.shape[1]:]
    (answer,) = engine.answer([prompt], GenerationOptions(max_new_tokens=5))
    assert answer.text == processor.tokenizer.decode(expected, skip_special_tokens=True).strip()
