"""The inference engine: chats rendered with the checkpoint's template, heads compressed once (memory, store,
video and batches alike), answers from caches equal to full-sequence decoding, sampling, stop strings,
streaming and token counts."""

import pytest
import torch

from llava_voco.engine import GenerationOptions, InferenceEngine
from llava_voco.conversation import get_template

from conftest import load_voco

GREEDY = GenerationOptions(max_new_tokens=5)


def ask(question, *images, system=None, history=()):
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": question}]
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": content}, *history]


def full_answer(model, processor, prompt, images, max_new_tokens=5):
    """Greedy decoding over the whole prompt with every vision token: what answers from caches must equal."""
    full = processor(images=images, text=prompt, return_tensors="pt")
    output = model.generate(**full, max_new_tokens=max_new_tokens, do_sample=False)[0, full["input_ids"].shape[1]:]
    return processor.tokenizer.decode(output, skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def engine(voco_dir):
    return InferenceEngine(*load_voco(voco_dir))


def test_render_is_the_templates_prompt_with_system_and_turns(engine, digit_images):
    template = get_template("v1")  # the fixture records no --version: the default
    prompt = engine.render(ask("What is the sum?", digit_images[0]))
    assert prompt.text == template.render([("human", "<image>\nWhat is the sum?")], 1, add_generation_prompt=True).text
    assert prompt.head == prompt.text[: prompt.text.index("<image>") + len("<image>")] and prompt.images == [digit_images[0]]
    turns = ask("What is the sum?", digit_images[0], system="Answer with a digit.",
                history=[{"role": "assistant", "content": "7"}, {"role": "user", "content": "And the largest?"}])
    text = engine.render(turns).text
    assert text.startswith("Answer with a digit. USER: <image>\nWhat is the sum? ASSISTANT: 7</s>USER: And the")
    assert text.endswith("largest? ASSISTANT:")
    with pytest.raises(ValueError, match="roles out of order"):
        engine.render([{"role": "assistant", "content": "hi"}])


def test_a_batch_about_different_images_equals_full_decoding_and_counts_tokens(engine, digit_images):
    model, processor = engine.model, engine.processor
    prompts = [engine.render(ask("What is the sum?", digit_images[1])),
               engine.render(ask("Which digit is at the top left?", digit_images[2])),
               engine.render(ask("What is the largest digit?", digit_images[1]))]
    passes = []
    handle = model.model.vision_tower.register_forward_hook(lambda *args: passes.append(1))
    try:
        answers = engine.answer(prompts, GREEDY)
        again = engine.answer(prompts[:1], GREEDY)
    finally:
        handle.remove()
    assert len(passes) == 2  # one compression per distinct image, then from memory
    for prompt, answer in zip(prompts, answers):
        assert answer.text == full_answer(model, processor, prompt.text, prompt.images)
        whole = processor(images=prompt.images, text=prompt.text)["input_ids"][0]
        assert answer.uncompressed_prompt_tokens == len(whole)
        assert answer.prompt_tokens == len(whole) - 16  # the tiny tower's 16 vision tokens are not read
        assert answer.completion_tokens <= 5 and answer.finish_reason in ("stop", "length")
    assert again[0].text == answers[0].text and again[0].cache_hit and not answers[1].cache_hit


def test_the_store_serves_images_and_video_across_engines(voco_dir, digit_images, tmp_path):
    video = digit_images[3:6]  # three frames
    messages = [{"role": "user", "content": [{"type": "video", "video": video},
                                             {"type": "text", "text": "What is the sum?"}]}]
    first = InferenceEngine(*load_voco(voco_dir), store=tmp_path / "store")
    [made] = first.answer([first.render(messages)], GREEDY)
    second = InferenceEngine(*load_voco(voco_dir), store=tmp_path / "store")
    prompt = second.render(messages)
    assert "<video>" in prompt.head and prompt.videos == [video]
    cache, hit = second.compress(prompt)
    assert hit and int(cache.num_images.sum()) == 3
    [loaded] = second.answer([prompt], GREEDY)
    assert loaded.cache_hit and loaded.text == made.text


def test_sampling_seed_stop_strings_and_streaming(engine, digit_images):
    prompt = engine.render(ask("What is the sum?", digit_images[7]))
    sampled = GenerationOptions(max_new_tokens=8, temperature=1.5, top_p=0.95, seed=3)
    first, second = engine.answer([prompt], sampled)[0], engine.answer([prompt], sampled)[0]
    assert first.text == second.text
    greedy = engine.answer([prompt], GenerationOptions(max_new_tokens=8))[0]
    stream = engine.stream(prompt, GenerationOptions(max_new_tokens=8))
    assert "".join(stream).strip() == greedy.text and stream.answer.text == greedy.text
    if len(greedy.text) > 2:  # a stop string inside the answer cuts it there, in both ways of answering
        stop = greedy.text[1:3]
        options = GenerationOptions(max_new_tokens=8, stop=(stop,))
        cut = engine.answer([prompt], options)[0]
        assert cut.text == greedy.text[: greedy.text.index(stop)].strip() and cut.finish_reason == "stop"
        assert stop not in "".join(engine.stream(prompt, options))
