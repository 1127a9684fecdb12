"""A conversation about one set of images (and a video): the chat CLI's session, on the inference engine.

The engine (``llava_voco.engine``) is stateless: it gets a whole conversation each call. :class:`ImageChat`
keeps the turns of one conversation and asks the engine, so that the media are compressed once (the engine
keeps the head in memory, or in its store) and each turn sends only the text after it. The image goes at
the start of the first human turn, as LLaVA's ``model_vqa`` and ``cli`` put it.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field

import torch

from .constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from .conversation import GPT, HUMAN, ConversationTemplate
from .engine import (  # noqa: F401  (load_model: also the demo's and the scripts' way in)
    GenerationOptions,
    InferenceEngine,
    check_model_path,
    load_model,
)
from .errors import InputError, one_line_errors  # noqa: F401
from .image_io import load_image
from .model.image_inputs import tokens_per_image
from .video import VideoError, load_video


def prompt_for_reply(template: ConversationTemplate, turns: list[tuple[str, str]], num_images: int) -> str:
    """The prompt that asks the model for the next reply after ``turns`` (which end with a human turn)."""
    return template.render(turns, num_images=num_images, add_generation_prompt=True).text


def first_human_turn(question: str, num_images: int, has_video: bool = False) -> str:
    return (IMAGE_PLACEHOLDER + "\n") * num_images + (VIDEO_PLACEHOLDER + "\n" if has_video else "") + question


def role_names(template: ConversationTemplate) -> tuple[str, str]:
    """The (user, assistant) names to show for ``template``: its roles without chat markup (ChatML's
    ``<|im_start|>user\\n`` shows as ``user``)."""
    names = tuple(re.sub(r"<\|[^|>]*\|>", "", role).strip(" \n:") for role in template.roles)
    return names[0] or "USER", names[1] or "ASSISTANT"


@contextlib.contextmanager
def count_vision_passes(model):
    """Counts forward passes of the vision tower (one per batch of images encoded)."""
    counter = {"passes": 0}
    handle = model.model.vision_tower.register_forward_hook(lambda *args: counter.__setitem__("passes", counter["passes"] + 1))
    try:
        yield counter
    finally:
        handle.remove()


def generation_options(generation_kwargs: dict) -> GenerationOptions:
    """``GenerationOptions`` from ``generate``-style keywords (``do_sample=False`` is greedy whatever the
    temperature); the keywords it has no field for pass through to ``generate``."""
    kwargs = dict(generation_kwargs)
    sample = kwargs.pop("do_sample", kwargs.get("temperature", 0) > 0)
    temperature = kwargs.pop("temperature", 1.0 if sample else 0.0)
    known = {name: kwargs.pop(name) for name in ("max_new_tokens", "top_p", "num_beams", "seed") if name in kwargs}
    stop = tuple(kwargs.pop("stop", ()))
    return GenerationOptions(temperature=temperature if sample else 0.0, stop=stop, generate_extra=kwargs, **known)


@dataclass
class ImageChat:
    """A conversation about ``images`` (and one ``video``, after them). With VoCo the media are compressed
    once; LLaMA-VID's context token reads the question (the human turn that shows the image, as in
    training), so there compression waits for the first question."""

    model: object
    processor: object
    template: ConversationTemplate
    images: list
    store: object | None = None  # a VoCoCacheStore
    generation_kwargs: dict = field(default_factory=dict)
    # one video, after the images: its frames (PIL images), or its precomputed frame features [frames, patches, dim]
    video: object | None = None

    def __post_init__(self):
        self.engine = InferenceEngine(self.model, self.processor, self.template, store=self.store)
        self.options = generation_options(self.generation_kwargs)
        self.turns: list[tuple[str, str]] = []
        self.has_video = self.video is not None and len(self.video) > 0
        media = len(self.images) + (1 if self.has_video else 0)
        self.uses_voco = self.engine.uses_voco and media > 0
        self.cache = None  # the compressed head, once made
        self.loaded_from_store = False
        self.head_text = self.engine.render(self._messages("?")).head if media else ""
        if self.uses_voco and not self.engine.reads_instruction:  # the head does not depend on the question
            self.cache, self.loaded_from_store = self.engine.compress(self.engine.render(self._messages("?")))

    def _messages(self, question: str) -> list[dict]:
        """The conversation so far and ``question``, as the engine takes it."""
        messages = []
        for number, (role, text) in enumerate([*self.turns, (HUMAN, question)]):
            if role == GPT:
                messages.append({"role": "assistant", "content": text})
                continue
            if number == 0:  # the media open the first human turn, as LLaVA puts them
                text = self._first_question if self.turns else text
                media = [{"type": "image", "image": image} for image in self.images]
                if self.has_video:
                    media.append({"type": "video", "video": self.video})
                messages.append({"role": "user", "content": [*media, {"type": "text", "text": text}]})
            else:
                messages.append({"role": "user", "content": text})
        return messages

    def cache_summary(self) -> str:
        """Cached positions and what the image would have cost without compression."""
        if not self.uses_voco:
            return "no VoCo cache (voco_tokens=0 or no image): every turn re-reads the whole prompt"
        if self.cache is None:
            return "the image is compressed with the first question (LLaMA-VID's context token reads it)"
        return self.engine.cache_summary(self.cache)

    def ask(self, question: str, keep_turn: bool = True) -> str:
        """Answer one question; with ``keep_turn`` it becomes part of the conversation (an empty reply does
        not: a template cannot render it)."""
        prompt = self.engine.render(self._messages(question))
        [answer] = self.engine.answer([prompt], self.options)
        self._keep(question, answer.text, keep_turn)
        return answer.text

    def ask_streaming(self, question: str, keep_turn: bool = True):
        """``ask``, yielding the answer's text as it is generated."""
        stream = self.engine.stream(self.engine.render(self._messages(question)), self.options)
        yield from stream
        self._keep(question, stream.answer.text, keep_turn)

    def _keep(self, question: str, answer: str, keep_turn: bool) -> None:
        if self.uses_voco and self.cache is None:  # LLaMA-VID: the head made with this question
            self.cache, self.loaded_from_store = self.engine.compress(self.engine.render(self._messages(question)))
        if keep_turn and answer:
            if not self.turns:
                self._first_question = question
                question = first_human_turn(question, len(self.images), self.has_video)
            self.turns = [*self.turns, (HUMAN, question), (GPT, answer)]

    def ask_batch(self, questions: list[str]) -> list[tuple[str, str]]:
        """(prompt, answer) for questions asked independently after the conversation so far, in one batch.
        LLaMA-VID with VoCo and no turn kept: each question is a first question, read by the context token,
        so the image is compressed once per distinct question."""
        prompts = [self.engine.render(self._messages(question)) for question in questions]
        return [(prompt.text, answer.text) for prompt, answer in zip(prompts, self.engine.answer(prompts, self.options))]


def image_tokens_per_frame(processor) -> int:
    """Tokens one video frame becomes in the LLM's sequence (image or LLaMA-VID tokens, plus VoCo)."""
    return tokens_per_image(processor, is_frame=True).total


def load_images(paths: list[str]) -> list:
    """The images at ``paths`` as RGB (``image_io.load_image``: a bad file raises one line naming it)."""
    return [load_image(path) for path in paths]


def read_video(path: str | os.PathLike, model, processor, fps: float = 1.0, max_frames: int | None = None):
    """A video for ``ImageChat``: its frames, or its precomputed frame features checked against this model
    and processor here, so that a features file of another vision tower is named in one line."""
    video = load_video(path, fps=fps, max_frames=max_frames, width=model.config.vision_config.hidden_size)
    if isinstance(video, torch.Tensor) and hasattr(processor, "check_frame_features"):
        try:
            processor.check_frame_features(video)
        except ValueError as error:
            raise VideoError(f"{path}: {error}") from None
    return video


__all__ = [
    "ImageChat",
    "count_vision_passes",
    "first_human_turn",
    "generation_options",
    "image_tokens_per_frame",
    "load_images",
    "prompt_for_reply",
    "read_video",
    "role_names",
]
