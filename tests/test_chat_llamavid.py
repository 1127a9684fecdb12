"""VoCo on LLaMA-VID tokens through ImageChat: the context token reads the question, as in training (the human
turn that shows the image), so the cache is made with it: answers equal the full masked forward's with the
same instruction."""

import pytest
import torch

from llava_voco import VoCoLlavaConfig
from llava_voco.conversation import get_template
from llava_voco.demo.tiny import train_wordpiece_tokenizer
from llava_voco.inference import ImageChat

from test_chat_continuation import record_generate
from test_llamavid_model import llamavid

LOGIT_ATOL = 1e-5


@pytest.fixture(scope="module")
def llamavid_voco(voco_dir, llava_dir):
    bert = train_wordpiece_tokenizer()
    voco_id = VoCoLlavaConfig.from_pretrained(voco_dir).voco_token_id
    model, processor = llamavid(llava_dir, bert, voco_dir=voco_dir, voco_tokens=1, voco_token_id=voco_id)
    processor.text_decoder_tokenizer = bert
    # At initialisation the context token barely depends on the instruction (logits move by ~1e-7, float
    # noise); queries that only read the instruction and sharper context attention make it depend on it
    # strongly (~4e-3), so a cache made with another instruction shows in the logits.
    projector = model.model.multi_modal_projector
    with torch.no_grad():
        projector.query_tokens.zero_()
        projector.query_projection.weight.mul_(30)
        projector.key_projection.weight.mul_(30)
    return model, processor


def first_logits(generate, call):
    """Logits of the first generated token for a recorded ImageChat call, from the cache it continued."""
    out = generate(input_ids=call["input_ids"], attention_mask=call["attention_mask"], past_key_values=call["cache"],
                   max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.logits[0]


def full_logits(model, processor, prompt, image, instruction):
    inputs = processor(images=[image], text=prompt, instructions=[instruction], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


def reference_cache(model, processor, head_text, image, instructions):
    """What compressing the head with each question as the image's instruction gives: one row per question."""
    inputs = processor(images=[image] * len(instructions), text=[head_text] * len(instructions),
                       instructions=instructions, return_tensors="pt")
    return model.compress(**inputs)


def assert_same_cache(cache, reference, atol=0.0):
    assert torch.equal(cache.token_ids, reference.token_ids)
    for ours, theirs in zip(cache.layers, reference.layers):
        torch.testing.assert_close(ours.keys, theirs.keys, atol=atol, rtol=0)
        torch.testing.assert_close(ours.values, theirs.values, atol=atol, rtol=0)


def test_the_cache_is_made_with_the_question_as_instruction(llamavid_voco, digit_images, monkeypatch):
    model, processor = llamavid_voco
    image = digit_images[7]
    # random weights may pick the <image> / <voco> ids, which no answer holds
    placeholders = [model.config.image_token_id, model.config.voco_token_id]
    greedy = {"max_new_tokens": 3, "do_sample": False, "suppress_tokens": placeholders}
    chat = ImageChat(model, processor, get_template("v1"), [image], generation_kwargs=greedy)
    calls, generate = record_generate(monkeypatch, model)
    questions = ["What is the sum of the digits?", "Which digit is at the top left?"]

    chat.ask(questions[0], keep_turn=False)
    [(prompt, _)] = chat.ask_batch(questions[:1])
    assert_same_cache(calls[0]["cache"], reference_cache(model, processor, chat.head_text, image, questions[:1]))
    default = reference_cache(model, processor, chat.head_text, image, [chat.head_text.replace("<image>", "")])
    assert not torch.equal(default.layers[-1].values, calls[0]["cache"].layers[-1].values)
    torch.testing.assert_close(first_logits(generate, calls[0]), full_logits(model, processor, prompt, image, questions[0]),
                               atol=LOGIT_ATOL, rtol=0)

    # a batch of first questions: one cache row per question, each made with its own question
    batch = chat.ask_batch(questions)
    assert_same_cache(calls[-1]["cache"], reference_cache(model, processor, chat.head_text, image, questions), atol=1e-6)
    logits = first_logits(generate, calls[-1])
    for row, ((prompt, _), question) in enumerate(zip(batch, questions)):
        torch.testing.assert_close(logits[row : row + 1], full_logits(model, processor, prompt, image, question),
                                   atol=LOGIT_ATOL, rtol=0)
