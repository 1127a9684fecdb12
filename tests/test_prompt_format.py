"""The prompt format a checkpoint carries: the chat template the train entry saves for ``--version`` renders
exactly the text the data pipeline trains on, for every template, and the engine renders the same."""

import json

import pytest

from llava_voco import VoCoLlavaProcessor
from llava_voco.conversation import TEMPLATES, get_template
from llava_voco.engine import InferenceEngine
from llava_voco.demo.tiny import LLAVA_V1_CHAT_TEMPLATE
from llava_voco.train.data import DataArguments, LazySupervisedDataset

from conftest import load_voco

VERSIONS = sorted({template.name for template in TEMPLATES.values()})
# LLaVA's data: the image placeholder where annotators put it (first, or after the question), several rounds.
CONVERSATION = [("<image>\nWhat is the sum?", "seven"), ("And the largest digit?", "four"), ("Is it odd?", "no")]
IMAGE_LAST = [("What is the sum?\n<image>", "seven")]


def training_text(tmp_path, image_folder, processor, version, rounds):
    """The text the data pipeline renders for a LLaVA sample of ``rounds`` (the train entry's settings)."""
    turns = [{"from": role, "value": value} for human, gpt in rounds for role, value in (("human", human), ("gpt", gpt))]
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"id": "s0", "image": "digit0.png", "conversations": turns}]))
    data_args = DataArguments(data_path=str(path), image_folder=str(image_folder), is_multimodal=True)
    dataset = LazySupervisedDataset(str(path), processor, data_args, version=version, model_max_length=2048)
    return dataset._prepare(0).rendered.text


def messages_of(rounds, image=None):
    """The same conversation in transformers' chat format: the image as a part before the question."""
    messages = []
    for number, (human, gpt) in enumerate(rounds):
        question = human.replace("<image>", "").strip()
        image_part = [{"type": "image", **({"image": image} if image is not None else {})}] if number == 0 else []
        messages += [{"role": "user", "content": [*image_part, {"type": "text", "text": question}]},
                     {"role": "assistant", "content": gpt}]
    return messages


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("rounds", [CONVERSATION, IMAGE_LAST], ids=["three_rounds", "image_after_question"])
def test_the_saved_chat_template_is_the_training_prompt(voco_dir, image_folder, digit_images, tmp_path, version,
                                                        rounds):
    if version == "plain":  # pretraining: one round, the question dropped
        rounds = rounds[:1]
    processor = VoCoLlavaProcessor.from_pretrained(voco_dir)
    processor.chat_template = get_template(version).chat_template()  # what the train entry saves
    trained = training_text(tmp_path, image_folder, processor, version, rounds)
    assert processor.apply_chat_template(messages_of(rounds)) == trained

    # the prompt for the last reply: training's text up to that reply (the space after a tag is learned)
    reply = rounds[-1][1]
    asked = processor.apply_chat_template(messages_of(rounds)[:-1], add_generation_prompt=True)
    assert trained.startswith(asked) and trained[len(asked):].lstrip(" ").startswith(reply)
    engine = InferenceEngine(*load_voco(voco_dir), template=version)
    assert engine.render(messages_of(rounds, digit_images[0])[:-1]).text == asked


def test_the_fixtures_template_was_not_the_training_prompt(voco_dir, image_folder, tmp_path):
    """Why the train entry saves the template: the v1 chat template a checkpoint copied from its tokenizer
    puts a space after each ``</s>`` that training never saw."""
    processor = VoCoLlavaProcessor.from_pretrained(voco_dir)
    processor.chat_template = LLAVA_V1_CHAT_TEMPLATE
    assert processor.apply_chat_template(messages_of(CONVERSATION)) != training_text(
        tmp_path, image_folder, processor, "v1", CONVERSATION)
