"""ImageChat continues its VoCo cache with exactly the tokens the whole prompt has after what the cache holds:
after a kept turn, in a batch, and with a real LLaMA SentencePiece tokenizer, whose pieces depend on the
text before them (a continuation tokenized on its own is not the end of the whole prompt's tokens)."""

import copy

import pytest
import torch
from transformers import AddedToken

from llava_voco import VoCoLlavaConfig, VoCoLlavaForConditionalGeneration, VoCoLlavaProcessor
from llava_voco.constants import IMAGE_PLACEHOLDER, VOCO_TOKEN
from llava_voco.conversation import GPT, HUMAN, get_template
from llava_voco.inference import ImageChat, first_human_turn, prompt_for_reply

from conftest import load_voco


def record_generate(monkeypatch, model):
    """Wraps ``model.generate``: per call, the new tokens and a snapshot of the cache they continue (a cache
    never changes a tensor in place, so a clone keeps what it held at the call)."""
    calls = []
    original = model.generate

    def recording(*args, **kwargs):
        cache = kwargs.get("past_key_values")
        calls.append({"input_ids": kwargs["input_ids"].clone(), "attention_mask": kwargs.get("attention_mask"),
                      "cache": cache.clone() if cache is not None else None})
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", recording)
    return calls, original


def tokens_read(call, row: int) -> list[int]:
    """What the model reads for ``row`` of a recorded call: the cache's real positions, then the new tokens."""
    cache = call["cache"]
    cached = 0 if cache.batch_size == 1 else row
    held = cache.token_ids[cached][cache.attention_mask[cached].bool()]
    new = call["input_ids"][row]
    if call["attention_mask"] is not None:
        new = new[call["attention_mask"][row].bool()]
    return torch.cat([held.cpu(), new.cpu()]).tolist()


def whole_prompt_read(processor, prompt: str, images: list) -> list[int]:
    """The whole prompt's tokens as the processor lays them out, less the vision tokens the cache drops."""
    ids = processor(images=images, text=prompt)["input_ids"][0]
    image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    return [token for token in ids if token != image_token_id]


def test_ask_batch_after_a_kept_turn_sends_only_what_the_cache_lacks(voco_dir, digit_images, monkeypatch):
    model, processor = load_voco(voco_dir)
    template = get_template("v1")
    greedy = {"max_new_tokens": 4, "do_sample": False}
    image = digit_images[3]
    chat = ImageChat(model, processor, template, [image], generation_kwargs=greedy)
    calls, generate = record_generate(monkeypatch, model)
    first = chat.ask("What is the sum?")
    questions = ["Which digit is at the top left?", "What is the largest digit?"]
    answers = chat.ask_batch(questions)
    history = [(HUMAN, first_human_turn("What is the sum?", 1)), (GPT, first)]
    for row, (question, (prompt, answer)) in enumerate(zip(questions, answers)):
        assert prompt == prompt_for_reply(template, [*history, (HUMAN, question)], 1)
        assert tokens_read(calls[-1], row) == whole_prompt_read(processor, prompt, [image])
        full = processor(images=image, text=prompt, return_tensors="pt")
        expected = generate(**full, **greedy)[0, full["input_ids"].shape[1]:]
        assert answer == processor.tokenizer.decode(expected, skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def llama_voco(voco_dir, llama_tokenizer):
    """A tiny VoCo model (k=1, random weights) over the real 32,000-token LLaMA tokenizer."""
    tokenizer = copy.deepcopy(llama_tokenizer)
    tokenizer.add_tokens([AddedToken(VOCO_TOKEN, special=True, normalized=False)], special_tokens=True)
    tiny = VoCoLlavaProcessor.from_pretrained(voco_dir)
    processor = VoCoLlavaProcessor(
        image_processor=tiny.image_processor, tokenizer=tokenizer, patch_size=tiny.patch_size,
        vision_feature_select_strategy=tiny.vision_feature_select_strategy,
        num_additional_image_tokens=tiny.num_additional_image_tokens, voco_tokens=1,
    )
    config = VoCoLlavaConfig.from_pretrained(voco_dir)
    config.text_config.vocab_size = len(tokenizer)
    config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    config.voco_token_id = tokenizer.convert_tokens_to_ids(VOCO_TOKEN)
    for name in ("bos", "eos", "pad"):
        setattr(config.text_config, f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
    torch.manual_seed(0)
    return VoCoLlavaForConditionalGeneration(config).eval(), processor


def test_a_continuation_tokenized_alone_is_not_the_end_of_the_whole_prompt(llama_tokenizer):
    """Why ImageChat splits the whole prompt's tokens: LLaMA's normalizer prepends "▁" to each piece of text."""
    alone = llama_tokenizer.convert_ids_to_tokens(llama_tokenizer(" ASSISTANT:", add_special_tokens=False)["input_ids"])
    whole = llama_tokenizer.convert_ids_to_tokens(llama_tokenizer("USER: Hi? ASSISTANT:")["input_ids"])
    assert alone[:2] == ["▁", "▁ASS"] and whole[-4:] == ["▁ASS", "IST", "ANT", ":"]


@pytest.mark.parametrize("version", ["v1", "llava_llama_2", "mpt"])
def test_every_turn_sends_the_whole_prompts_tokens_after_the_cache(llama_voco, digit_images, monkeypatch, version):
    """Two kept turns, then a batch: each time the cache plus the tokens sent are the whole prompt's tokens
    (less vision), whatever the model generated in earlier turns (random weights: odd pieces that the
    rendered answer tokenizes differently) and where the template puts text after ``<image>``."""
    model, processor = llama_voco
    tokenizer = processor.tokenizer
    template = get_template(version)
    greedy = {"max_new_tokens": 3, "do_sample": False, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id}
    image = digit_images[5]
    chat = ImageChat(model, processor, template, [image], generation_kwargs=greedy)
    calls, _ = record_generate(monkeypatch, model)
    prompts = []
    for question in ("What is the sum?", "Which digit is at the top left?"):
        turns = [*chat.turns, (HUMAN, first_human_turn(question, 1) if not chat.turns else question)]
        prompts.append(prompt_for_reply(template, turns, 1))
        chat.ask(question)
    batch = chat.ask_batch(["What is the largest digit?", "How many digits?"])
    for call, prompt in zip(calls, prompts):
        assert tokens_read(call, 0) == whole_prompt_read(processor, prompt, [image])
    for row, (prompt, _) in enumerate(batch):
        assert tokens_read(calls[-1], row) == whole_prompt_read(processor, prompt, [image])
