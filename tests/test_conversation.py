"""Conversation templates: LLaVA's exact prompt strings and the spans that are learned.

The expected strings are written out by hand from LLaVA's template definitions (system prompt, role
tags, separators) for one two-round sample with an image; ``test_data.py`` checks the token ids and
labels the same strings give.
"""

import pytest

from llava_voco.conversation import (
    TEMPLATES,
    ConversationError,
    UnknownTemplateError,
    get_template,
)

TWO_ROUNDS = [
    ("human", "<image>\nWhat is the sum?"),
    ("gpt", "seven"),
    ("human", "And the largest digit?"),
    ("gpt", "four"),
]
ONE_ROUND = TWO_ROUNDS[:2]

VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)

# name -> (prompt split after each round, learned strings). "".join(rounds) is the whole prompt. Where a
# space separates the assistant's tag from its reply, the space is learned: the reply is generated from a
# prompt ending at the tag, and a digit-splitting tokenizer makes " 7" two tokens ("▁", "7").
GOLDEN = {
    "plain": (
        ["<image>seven\n"],
        ["seven\n"],
    ),
    "v1": (
        [VICUNA + " USER: <image>\nWhat is the sum? ASSISTANT: seven</s>",
         "USER: And the largest digit? ASSISTANT: four</s>"],
        [" seven</s>", " four</s>"],
    ),
    "llava_llama_2": (
        ["[INST] <<SYS>>\n" + LLAVA_SYSTEM + "\n<</SYS>>\n\n<image>\nWhat is the sum? [/INST] seven </s>",
         "<s>[INST] And the largest digit? [/INST] four </s>"],
        [" seven </s>", " four </s>"],
    ),
    "mistral_instruct": (
        ["[INST] <image>\nWhat is the sum? [/INST] seven </s>",
         "[INST] And the largest digit? [/INST] four </s>"],
        [" seven </s>", " four </s>"],
    ),
    "chatml_direct": (
        ["<|im_start|>system\nAnswer the questions.<|im_end|>"
         "<|im_start|>user\n<image>\nWhat is the sum?<|im_end|><|im_start|>assistant\nseven<|im_end|>",
         "<|im_start|>user\nAnd the largest digit?<|im_end|><|im_start|>assistant\nfour<|im_end|>"],
        ["seven<|im_end|>", "four<|im_end|>"],
    ),
    "llama_3": (
        ["<|start_header_id|>system<|end_header_id|>\n\n" + LLAVA_SYSTEM + "<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is the sum?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\nseven<|eot_id|>",
         "<|start_header_id|>user<|end_header_id|>\n\nAnd the largest digit?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\nfour<|eot_id|>"],
        ["seven<|eot_id|>", "four<|eot_id|>"],
    ),
    # The released VoCo-LLaMA code: image first, its own system prompt, <image> and newlines removed.
    "voco_official": (
        ["<image>\nA chat between a curious user and an artificial intelligence assistant of the image. "
         "The assistant gives helpful, detailed, and polite answers to the user's questions. "
         "USER: What is the sum? ASSISTANT: seven</s>",
         "USER: And the largest digit? ASSISTANT: four</s>"],
        [" seven</s>", " four</s>"],
    ),
}


def golden_turns(name):
    return ONE_ROUND if name == "plain" else TWO_ROUNDS


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_prompt_and_learned_spans(name):
    rounds, learned = GOLDEN[name]
    rendered = get_template(name).render(golden_turns(name), num_images=1)
    assert rendered.text == "".join(rounds)
    assert rendered.targets == learned
    # Each round ends right after its reply's end-of-turn string: the cut points for truncation.
    assert rendered.round_ends == [len("".join(rounds[: n + 1])) for n in range(len(rounds))]
    assert [end for _, end in rendered.target_spans] == rendered.round_ends


def test_aliases_and_llava_v1_system():
    assert get_template("vicuna_v1") is get_template("v1")
    assert get_template("v0_plain") is get_template("plain")
    assert get_template("mistral_direct") is get_template("chatml_direct")
    text = get_template("llava_v1").render(ONE_ROUND).text
    assert text.startswith("A chat between a curious human and an artificial intelligence assistant. ")
    assert text.endswith("the human's questions. USER: <image>\nWhat is the sum? ASSISTANT: seven</s>")


def test_llama_2_system_block_and_mpt():
    text = get_template("llama_2").render(ONE_ROUND).text
    assert text.startswith("[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant.")
    assert text.endswith("don't share false information.\n<</SYS>>\n\n<image>\nWhat is the sum? [/INST] seven </s>")
    mpt = get_template("mpt").render(ONE_ROUND)
    assert mpt.text == (
        "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The assistant gives "
        "helpful and honest answers.<|im_end|><|im_start|>user\n<image>\nWhat is the sum?<|im_end|>"
        "<|im_start|>assistant\nseven<|im_end|>"
    )


def test_plain_keeps_one_placeholder_per_image_and_drops_the_question():
    rendered = get_template("plain").render([("human", "Describe <image> <image>"), ("gpt", "two digits")], 2)
    assert rendered.text == "<image><image>two digits\n"
    assert get_template("plain").render([("human", "Say it"), ("gpt", "hello")], 0).text == "hello\n"


def test_voco_official_text_only_and_two_images():
    template = get_template("voco_official")
    text_only = template.render([("human", "Hi\nthere"), ("gpt", "hello")], 0).text
    assert text_only.endswith("questions. USER: Hi\nthere ASSISTANT: hello</s>")  # newlines kept without an image
    two = template.render([("human", "<image>\n<image>\nSame digit?"), ("gpt", "yes\nreally")], 2)
    assert two.text.startswith("<image>\n<image>\nA chat between")
    assert two.text.endswith("USER: Same digit? ASSISTANT: yesreally</s>")
    assert two.targets == [" yesreally</s>"]


@pytest.mark.parametrize(
    "turns, message",
    [
        ([("gpt", "hi"), ("human", "hello")], "roles out of order: turn 0 is from 'gpt'"),
        ([("human", "a"), ("human", "b"), ("gpt", "c")], "roles out of order: turn 1 is from 'human'"),
        ([("human", "a"), ("gpt", "b"), ("human", "c")], "roles out of order: the last turn"),
        ([("human", "a"), ("bot", "b")], "roles out of order: turn 1 is from 'bot'"),
        ([("human", "a"), ("gpt", "  ")], "empty assistant turn: turn 1"),
        ([], "no turns"),
    ],
)
def test_bad_turns(turns, message):
    with pytest.raises(ConversationError, match=message):
        get_template("v1").render(turns)


def test_plain_takes_one_round_and_unknown_version_lists_names():
    with pytest.raises(ConversationError, match="takes one 'human' and one 'gpt' turn, got 4"):
        get_template("plain").render(TWO_ROUNDS, 1)
    with pytest.raises(UnknownTemplateError) as error:
        get_template("vicuna_v2")
    assert "'vicuna_v2'" in str(error.value)
    for name in ("plain", "v1", "llava_llama_2", "mistral_instruct", "chatml_direct", "llama_3", "voco_official"):
        assert name in str(error.value) and name in TEMPLATES
