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
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from .conversation import GPT, HUMAN, ConversationError, ConversationTemplate, UnknownTemplateError
from .image_io import ImageReadError, load_image
from .model.image_inputs import tokens_per_image
from .model.voco_cache import VoCoCache
from .video import VideoError, load_video

_REPLY_PROBE = "x"  # a stand-in reply: rendering it shows where the assistant's text starts
_PLACEHOLDERS = re.compile(f"{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)}")


class InputError(ValueError):
    """A user's mistake in what an entry was given (a missing model folder, a bad line in a question or
    answers file); the message names the file and the problem in one line."""


# What the entries report as one line: the user's mistakes, never bugs (those keep their traceback).
USER_ERRORS = (InputError, ImageReadError, VideoError, UnknownTemplateError, ConversationError)


@contextlib.contextmanager
def one_line_errors():
    """Around an entry's work: a user's mistake (``USER_ERRORS``) ends the process with one line on stderr
    and exit status 1, where a traceback would bury the file name under frames the user cannot act on."""
    try:
        yield
    except USER_ERRORS as error:
        print("error: " + " ".join(str(error).split("\n")), file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def prompt_for_reply(template: ConversationTemplate, turns: list[tuple[str, str]], num_images: int) -> str:
    """The prompt that asks the model for the next reply after ``turns`` (which end with a human turn)."""
    rendered = template.render([*turns, (GPT, _REPLY_PROBE)], num_images=num_images)
    return rendered.text[: rendered.target_spans[-1][0]].rstrip(" ")


def first_human_turn(question: str, num_images: int, has_video: bool = False) -> str:
    return (IMAGE_PLACEHOLDER + "\n") * num_images + (VIDEO_PLACEHOLDER + "\n" if has_video else "") + question


def media_instruction(turn_text: str) -> str:
    """LLaMA-VID's instruction for the images of a human turn: the turn without its placeholders, as the
    training data gives it (so the context token reads the question at inference as it did in training)."""
    return _PLACEHOLDERS.sub("", turn_text).strip()


def role_names(template: ConversationTemplate) -> tuple[str, str]:
    """The (user, assistant) names to show for ``template``: its roles without chat markup (ChatML's
    ``<|im_start|>user\\n`` shows as ``user``)."""
    names = tuple(re.sub(r"<\|[^|>]*\|>", "", role).strip(" \n:") for role in template.roles)
    return names[0] or "USER", names[1] or "ASSISTANT"


def ids_after_media(tokenizer, prompt: str, image_token_id: int) -> list[int]:
    """The token ids of ``prompt`` after its last image/video placeholder, cut from the tokens of the WHOLE
    prompt: a SentencePiece tokenizer splits text by what precedes it (LLaMA's prepends "▁" to each piece),
    so a continuation tokenized on its own is not the end of the prompt the model was trained on. ``<video>``
    is read as ``<image>``: the processor turns it into image tokens before tokenizing."""
    ids = list(tokenizer(prompt.replace(VIDEO_PLACEHOLDER, IMAGE_PLACEHOLDER))["input_ids"])
    positions = [index for index, token in enumerate(ids) if token == image_token_id]
    if not positions:
        raise ValueError(f"the prompt has no {IMAGE_PLACEHOLDER} or {VIDEO_PLACEHOLDER}: {prompt[:80]!r}")
    return ids[positions[-1] + 1 :]


def _shared_length(first: list[int], second: list[int]) -> int:
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


def _truncated(cache: VoCoCache, length: int) -> VoCoCache:
    """A copy of a one-row cache (nothing appended by decoding) that keeps its first ``length`` positions;
    text resumes right after them."""
    dropped = cache.described_length - length
    out = cache.clone()
    for layer in out.layers:
        layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]
    out.token_ids, out.attention_mask = out.token_ids[:, :length], out.attention_mask[:, :length]
    out.next_position = out.next_position - dropped
    return out


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
    """A conversation about ``images`` (and one ``video``). With VoCo the media are compressed once and each
    turn sends only the tokens the cache lacks; LLaMA-VID's context token reads the question (the human turn
    that shows the image, as in training), so there compression waits for the first question."""

    model: object
    processor: object
    template: ConversationTemplate
    images: list
    store: object | None = None  # a VoCoCacheStore
    generation_kwargs: dict = field(default_factory=dict)
    # one video, after the images: its frames (PIL images), or its precomputed frame features [frames, patches, dim]
    video: object | None = None

    def __post_init__(self):
        self.template.lay_out_voco(self.processor)
        self.turns: list[tuple[str, str]] = []
        self.has_video = self.video is not None and len(self.video) > 0
        self.media = len(self.images) + (1 if self.has_video else 0)  # placeholders in the first turn
        self.uses_voco = getattr(self.model.config, "voco_tokens", 0) > 0 and self.media > 0
        self.reads_instruction = getattr(self.processor, "llamavid_compress_type", None) is not None and self.media > 0
        self.cache: VoCoCache | None = None
        self.cache_instruction: str | None = None  # what the cache's context tokens read (LLaMA-VID)
        self.head_length = 0  # cached positions of the prompt up to the last placeholder
        self.loaded_from_store = False
        if self.uses_voco:
            probe = prompt_for_reply(self.template, [(HUMAN, self._first_turn("?"))], len(self.images))
            last = VIDEO_PLACEHOLDER if self.has_video else IMAGE_PLACEHOLDER
            self.head_text = probe[: probe.rindex(last) + len(last)]
            if not self.reads_instruction:  # the compressed image does not depend on the question
                self._keep_cache(self._compress([None]), None)

    # -- VoCo ----------------------------------------------------------------------------------
    def _compress(self, instructions: list[str | None]) -> VoCoCache:
        """The head compressed once per instruction (one cache row each; ``[None]``: no LLaMA-VID)."""
        media_instructions = [text for text in instructions for _ in range(self.media)] if self.reads_instruction else None
        if self.store is not None and not self.has_video and len(instructions) == 1:
            cache, self.loaded_from_store = self.store.get_or_compress(
                self.model, self.processor, self.images, self.head_text, instructions=media_instructions
            )
            return cache
        extra = {"instructions": media_instructions} if media_instructions is not None else {}
        inputs = self.processor(text=[self.head_text] * len(instructions), return_tensors="pt",
                                **self._media(len(instructions)), **extra)
        return self.model.compress(**inputs.to(self.model.device))

    def _keep_cache(self, cache: VoCoCache, instruction: str | None) -> None:
        self.cache, self.cache_instruction, self.head_length = cache, instruction, cache.described_length

    def _cache_for(self, instruction: str) -> None:
        """LLaMA-VID: the conversation's cache is made with its first question; until a turn is kept each
        question is a first one, and another question needs its own compression."""
        if self.cache is None or (self.reads_instruction and not self.turns and instruction != self.cache_instruction):
            self._keep_cache(self._compress([instruction]), instruction)

    def _continuation(self, prompts: list[str]) -> tuple[VoCoCache, list[list[int]]]:
        """(cache, tokens to send for each prompt). The cache is cut back to what it shares with every prompt's
        tokens (a kept answer as generated may tokenize otherwise once rendered in the conversation, and the
        template may re-render earlier text); each prompt then sends the rest of its own tokens."""
        wanted = [ids_after_media(self.processor.tokenizer, prompt, self.processor.image_token_id) for prompt in prompts]
        held = self.cache.token_ids[0, self.head_length :].tolist()  # the conversation's cache has one row
        shared = min(min(_shared_length(held, ids) for ids in wanted), min(len(ids) for ids in wanted) - 1)
        cache = self.cache if shared == len(held) else _truncated(self.cache, self.head_length + shared)
        return cache, [ids[shared:] for ids in wanted]

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
        if self.cache is None:
            return "the image is compressed with the first question (LLaMA-VID's context token reads it)"
        vision = int(self.cache.vision_tokens_dropped.sum())
        voco = self.cache.voco_tokens * int(self.cache.num_images.sum())  # an elastic model's k: the cache's
        cached = self.cache.get_seq_length()
        return (
            f"cached positions: {cached} (without compression: {cached + vision}); "
            f"{vision} vision tokens -> {voco} VoCo token(s), compression ratio {vision / voco:.0f}x"
        )

    # -- asking ----------------------------------------------------------------------------------
    def _instruction(self, turns: list[tuple[str, str]]) -> str:
        """The instruction LLaMA-VID's context token reads: the human turn that shows the media (the first)."""
        return media_instruction(turns[0][1])

    def _instructions(self, instructions: list[str]) -> dict:
        """The processor's ``instructions`` for prompts with these instructions (one per placeholder)."""
        if not self.reads_instruction:
            return {}
        return {"instructions": [text for text in instructions for _ in range(self.media)]}

    def _turns_with(self, question: str) -> list[tuple[str, str]]:
        text = self._first_turn(question) if not self.turns else question
        return [*self.turns, (HUMAN, text)]

    def _new_tokens(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows`` left padded into ``(input_ids, attention_mask)``; padding is masked, so any id does where
        the tokenizer has no pad token (its end of sequence then, as ``generate`` pads)."""
        tokenizer = self.processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        width = max(len(row) for row in rows)
        ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=self.model.device)
        return ids, mask

    def ask(self, question: str, keep_turn: bool = True, streamer=None) -> str:
        """Answer one question; with ``keep_turn`` it becomes part of the conversation (an empty reply does
        not: a template cannot render it, and the cache is cut back at the next turn)."""
        turns = self._turns_with(question)
        prompt = prompt_for_reply(self.template, turns, len(self.images))
        tokenizer = self.processor.tokenizer
        if self.uses_voco:
            if not prompt.startswith(self.head_text):
                raise RuntimeError("the conversation template re-wrote the text before the image; cannot continue the cache")
            self._cache_for(self._instruction(turns))
            cache, [sent] = self._continuation([prompt])
            input_ids, attention_mask = self._new_tokens([sent])
            output = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, keep_turn=keep_turn,
                streamer=streamer, **self.generation_kwargs,
            )
            if keep_turn:
                self.cache = cache  # extended by generate with this turn
        else:
            inputs = self.processor(text=prompt, return_tensors="pt", **self._media(1),
                                    **self._instructions([self._instruction(turns)])).to(self.model.device)
            input_ids = inputs["input_ids"]
            output = self.model.generate(**stock_llava_inputs(self.model, inputs), streamer=streamer,
                                         **self.generation_kwargs)
        answer = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip()
        if keep_turn and answer:
            self.turns = [*turns, (GPT, answer)]
        return answer

    def ask_batch(self, questions: list[str]) -> list[tuple[str, str]]:
        """(prompt, answer) for questions asked independently after the conversation so far, in one batch.

        LLaMA-VID with VoCo and no turn kept: each question is a first question, read by the context token,
        so the image is compressed once per distinct question (one cache row each)."""
        all_turns = [self._turns_with(question) for question in questions]
        prompts = [prompt_for_reply(self.template, turns, len(self.images)) for turns in all_turns]
        instructions = [self._instruction(turns) for turns in all_turns]
        tokenizer = self.processor.tokenizer
        if self.uses_voco:
            if self.reads_instruction and not self.turns:
                distinct = list(dict.fromkeys(instructions))
                cache = self._compress(distinct)
                if len(distinct) < len(questions):
                    cache = cache.repeat_rows(torch.tensor([distinct.index(text) for text in instructions]))
                sent = [ids_after_media(tokenizer, prompt, self.processor.image_token_id) for prompt in prompts]
            else:
                self._cache_for(instructions[0])
                cache, sent = self._continuation(prompts)
            input_ids, attention_mask = self._new_tokens(sent)
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                                         **self.generation_kwargs)
        else:
            previous_side, tokenizer.padding_side = tokenizer.padding_side, "left"
            try:
                inputs = self.processor(text=prompts, return_tensors="pt", padding=True, **self._media(len(prompts)),
                                        **self._instructions(instructions))
            finally:
                tokenizer.padding_side = previous_side
            inputs = inputs.to(self.model.device)
            input_ids = inputs["input_ids"]
            output = self.model.generate(**stock_llava_inputs(self.model, inputs), **self.generation_kwargs)
        answers = tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
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


def check_model_path(model_path: str) -> None:
    """A local model folder must exist and hold a ``config.json``; a Hub id (``org/name``) is left to
    ``from_pretrained``."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise InputError(f"{model_path}: not a model folder (no config.json)")
        return
    if path.exists():
        raise InputError(f"{model_path}: not a model folder")
    looks_local = path.is_absolute() or model_path.startswith((".", "~")) or model_path.count("/") != 1
    if looks_local:
        raise InputError(f"{model_path}: no such model folder")


def check_voco_tokens(model_path: str, voco_tokens: int) -> None:
    """``--voco-tokens k``: a count the checkpoint was trained for (an elastic model's set), checked from its
    config alone, before any weight is read."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    if getattr(config, "voco_tokens", 0) == 0:
        raise InputError(f"--voco-tokens {voco_tokens}: {model_path} has no VoCo tokens (voco_tokens=0)")
    try:
        config.check_voco_tokens(voco_tokens)
    except ValueError as error:
        raise InputError(f"--voco-tokens {voco_tokens}: {model_path}: {error}") from None


def load_model(model_path: str, device: str | None = None, dtype: str | None = None,
               attn_implementation: str | None = None, voco_tokens: int | None = None):
    """Any checkpoint this package saves (VoCo or plain Llava), with its processor. ``attn_implementation``:
    as transformers', plus ``varlen_reference`` / ``varlen_torch``; ``flash_attention_2`` without flash-attn
    is refused before any weight is read. ``voco_tokens``: an elastic model's k (docs/design.md §2.7), which
    the processor then lays out after each image (refused before loading when the model was not trained
    for it)."""
    import llava_voco  # noqa: F401  (registers the Auto classes and the varlen backends)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .model.llava_original import LlavaCheckpointError, is_llava_original, load_llava_original
    from .model.varlen import FlashAttentionUnavailable, require_flash_attn

    check_model_path(model_path)
    if voco_tokens is not None:
        check_voco_tokens(model_path, voco_tokens)
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    if attn_implementation:
        if attn_implementation == "flash_attention_2":
            try:
                require_flash_attn()
            except FlashAttentionUnavailable as error:
                raise InputError(str(error)) from None
        kwargs["attn_implementation"] = attn_implementation
    try:
        if is_llava_original(model_path):  # LLaVA's own format: converted on the fly (scripts/convert_llava_checkpoint.py)
            model, processor = load_llava_original(model_path, dtype=kwargs.get("dtype"),
                                                   attn_implementation=attn_implementation)
        else:
            model = AutoModelForImageTextToText.from_pretrained(model_path, **kwargs).eval()
            processor = AutoProcessor.from_pretrained(model_path)
    except LlavaCheckpointError as error:
        raise InputError(str(error)) from None
    except OSError as error:  # a Hub id that cannot be fetched, a folder with missing files
        raise InputError(f"{model_path}: cannot load the model: {str(error).strip().splitlines()[0]}") from None
    if device:
        model.to(device)
    if voco_tokens is not None:
        processor.voco_tokens = voco_tokens  # every prompt's images get k VoCo tokens; compress reads k from them
    return model, processor


__all__ = [
    "ImageChat",
    "InputError",
    "USER_ERRORS",
    "check_model_path",
    "check_voco_tokens",
    "count_vision_passes",
    "first_human_turn",
    "ids_after_media",
    "image_tokens_per_frame",
    "load_images",
    "load_model",
    "media_instruction",
    "one_line_errors",
    "prompt_for_reply",
    "read_video",
    "role_names",
    "stock_llava_inputs",
]
