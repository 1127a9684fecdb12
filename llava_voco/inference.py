"""Questions about an image, answered the VoCo way: compress the image once, answer from the cache.

The one module the chat CLI (``llava_voco.serve.cli``), the eval entry (``llava_voco.eval.model_vqa``),
the scripts and the demo share for inference, so that none of them imports another entry. The prompt text
comes from LLaVA's conversation templates (``llava_voco.conversation``); the image goes at the start of the
first human turn, as LLaVA's ``model_vqa`` and ``cli`` put it. A model without VoCo (``voco_tokens=0``) is
answered the plain way, re-reading the whole conversation with the image each turn, so the same tools
evaluate both.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from .conversation import GPT, HUMAN, ConversationTemplate
from .image_io import load_image
from .model.image_inputs import tokens_per_image
from .model.voco_cache import VoCoCache

_REPLY_PROBE = "x"  # a stand-in reply: rendering it shows where the assistant's text starts


def prompt_for_reply(template: ConversationTemplate, turns: list[tuple[str, str]], num_images: int) -> str:
    """The prompt that asks the model for the next reply after ``turns`` (which end with a human turn)."""
    rendered = template.render([*turns, (GPT, _REPLY_PROBE)], num_images=num_images)
    return rendered.text[: rendered.target_spans[-1][0]].rstrip(" ")


def first_human_turn(question: str, num_images: int, has_video: bool = False) -> str:
    return (IMAGE_PLACEHOLDER + "\n") * num_images + (VIDEO_PLACEHOLDER + "\n" if has_video else "") + question


@contextlib.contextmanager
def count_vision_passes(model):
    """Counts forward passes of the vision tower (one per batch of images encoded)."""
    counter = {"passes": 0}
    handle = model.model.vision_tower.register_forward_hook(lambda *args: counter.__setitem__("passes", counter["passes"] + 1))
    try:
        yield counter
    finally:
        handle.remove()


@dataclass
class ImageChat:
    """A conversation about ``images``; with VoCo the images are compressed once, at construction."""

    model: object
    processor: object
    template: ConversationTemplate
    images: list
    store: object | None = None  # a VoCoCacheStore
    generation_kwargs: dict = field(default_factory=dict)
    # one video, after the images: its frames (PIL images), or its precomputed frame features [frames, patches, dim]
    video: object | None = None

    def __post_init__(self):
        self.turns: list[tuple[str, str]] = []
        self.has_video = self.video is not None and len(self.video) > 0
        self.media = len(self.images) + (1 if self.has_video else 0)  # placeholders in the first turn
        self.uses_voco = getattr(self.model.config, "voco_tokens", 0) > 0 and self.media > 0
        self.cache: VoCoCache | None = None
        self.loaded_from_store = False
        if self.uses_voco:
            probe = prompt_for_reply(self.template, [(HUMAN, self._first_turn("?"))], len(self.images))
            last = VIDEO_PLACEHOLDER if self.has_video else IMAGE_PLACEHOLDER
            self.head_text = probe[: probe.rindex(last) + len(last)]
            self.consumed_text = self.head_text  # prompt text the cache already holds
            self.cache = self.compress(self.head_text)

    # -- VoCo ----------------------------------------------------------------------------------
    def compress(self, head_text: str) -> VoCoCache:
        if self.store is not None and not self.has_video:
            cache, self.loaded_from_store = self.store.get_or_compress(self.model, self.processor, self.images, head_text)
            return cache
        inputs = self.processor(text=head_text, return_tensors="pt", **self._media(1)).to(self.model.device)
        return self.model.compress(**inputs)

    def _first_turn(self, question: str) -> str:
        return first_human_turn(question, len(self.images), has_video=self.has_video)

    def _media(self, copies: int) -> dict:
        """The processor's image/video arguments for ``copies`` prompts."""
        media = {"images": self.images * copies or None}
        if self.has_video:
            media["videos"] = [self.video] * copies
        return media

    def cache_summary(self) -> str:
        """Cached positions and what the image would have cost without compression."""
        if not self.uses_voco:
            return "no VoCo cache (voco_tokens=0 or no image): every turn re-reads the whole prompt"
        vision = int(self.cache.vision_tokens_dropped.sum())
        voco = self.model.config.voco_tokens * int(self.cache.num_images.sum())
        cached = self.cache.get_seq_length()
        return (
            f"cached positions: {cached} (without compression: {cached + vision}); "
            f"{vision} vision tokens -> {voco} VoCo token(s), compression ratio {vision / voco:.0f}x"
        )

    # -- asking ----------------------------------------------------------------------------------
    def _instructions(self, questions: list[str]) -> dict:
        """LLaMA-VID reads each image's instruction: the question asked about it."""
        if getattr(self.processor, "llamavid_compress_type", None) is None or not self.media:
            return {}
        return {"instructions": [q for q in questions for _ in range(self.media)]}

    def _turns_with(self, question: str) -> list[tuple[str, str]]:
        text = self._first_turn(question) if not self.turns else question
        return [*self.turns, (HUMAN, text)]

    def ask(self, question: str, keep_turn: bool = True, streamer=None) -> str:
        """Answer one question; with ``keep_turn`` it becomes part of the conversation."""
        turns = self._turns_with(question)
        prompt = prompt_for_reply(self.template, turns, len(self.images))
        tokenizer = self.processor.tokenizer
        if self.uses_voco:
            if not prompt.startswith(self.consumed_text):
                raise RuntimeError("the conversation template re-wrote earlier turns; cannot continue the cache")
            new_text = prompt[len(self.consumed_text) :]
            inputs = tokenizer(new_text, add_special_tokens=False, return_tensors="pt").to(self.model.device)
            output = self.model.generate(
                **inputs, past_key_values=self.cache, keep_turn=keep_turn, streamer=streamer, **self.generation_kwargs
            )
            answer_ids = output[0, inputs["input_ids"].shape[1] :]
        else:
            inputs = self.processor(text=prompt, return_tensors="pt", **self._media(1),
                                    **self._instructions([question])).to(self.model.device)
            output = self.model.generate(**stock_llava_inputs(self.model, inputs), streamer=streamer,
                                         **self.generation_kwargs)
            answer_ids = output[0, inputs["input_ids"].shape[1] :]
        answer = tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
        if keep_turn:
            self.turns = [*turns, (GPT, answer)]
            if self.uses_voco:
                rendered = self.template.render(self.turns, num_images=len(self.images))
                self.consumed_text = rendered.text[: rendered.target_spans[-1][1]]
        return answer

    def ask_batch(self, questions: list[str]) -> list[tuple[str, str]]:
        """(prompt, answer) for independent single-turn questions, in one batch."""
        prompts = [prompt_for_reply(self.template, self._turns_with(q), len(self.images)) for q in questions]
        tokenizer = self.processor.tokenizer
        previous_side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            if self.uses_voco:
                new_texts = [p[len(self.head_text) :] for p in prompts]
                inputs = tokenizer(new_texts, add_special_tokens=False, return_tensors="pt", padding=True)
                inputs = inputs.to(self.model.device)
                output = self.model.generate(**inputs, past_key_values=self.cache, **self.generation_kwargs)
            else:
                inputs = self.processor(text=prompts, return_tensors="pt", padding=True, **self._media(len(prompts)),
                                        **self._instructions(questions))
                inputs = inputs.to(self.model.device)
                output = self.model.generate(**stock_llava_inputs(self.model, inputs), **self.generation_kwargs)
        finally:
            tokenizer.padding_side = previous_side
        answers = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [(prompt, answer.strip()) for prompt, answer in zip(prompts, answers)]


def stock_llava_inputs(model, inputs):
    """Without VoCo a checkpoint loads as stock ``LlavaForConditionalGeneration``, which reads a video's
    frames as plain images and has no ``video_frame_mask`` input (only LLaMA-VID needs it)."""
    from .model.modeling_voco_llava import VoCoLlavaForConditionalGeneration

    if not isinstance(model, VoCoLlavaForConditionalGeneration) and "video_frame_mask" in inputs:
        inputs = {k: v for k, v in inputs.items() if k != "video_frame_mask"}
    return inputs


def image_tokens_per_frame(processor) -> int:
    """Tokens one video frame becomes in the LLM's sequence (image or LLaMA-VID tokens, plus VoCo)."""
    return tokens_per_image(processor, is_frame=True).total


def load_images(paths: list[str]) -> list:
    """The images at ``paths`` as RGB (``image_io.load_image``: a bad file raises one line naming it)."""
    return [load_image(path) for path in paths]


def load_model(model_path: str, device: str | None = None, dtype: str | None = None):
    """Any checkpoint this package saves (VoCo or plain Llava), with its processor."""
    import llava_voco  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    model = AutoModelForImageTextToText.from_pretrained(model_path, **kwargs).eval()
    if device:
        model.to(device)
    processor = AutoProcessor.from_pretrained(model_path)
    return model, processor
