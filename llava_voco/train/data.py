"""LLaVA's training data (its JSON format, flags and templates) through a ``VoCoLlavaProcessor``.

A sample is ``{"id", "image": str | [str] (optional), "video": str (optional: a file PyAV decodes or a
folder of frames, at ``--video_fps`` up to ``--max_frames``; or a ``.safetensors`` file of precomputed frame
features, ``[frames, patches, dim]``, up to ``--max_frames``), "conversations": [{"from": "human" | "gpt",
"value"}]}``, in a JSON list or a JSONL file. A video's placeholder is ``<video>`` (an ``<image>`` in a
sample with a video and no images is read as it); each frame becomes an image with its own VoCo tokens.
The processor does everything that depends on the model: image preprocessing, expanding each ``<image>``
to the vision tokens and appending the VoCo tokens. Labels come from character spans
(``llava_voco.conversation``) mapped through the tokenizer's offsets, so they are exact for any
(fast) tokenizer; one that gives no offsets is refused.

Dataset items (``LazySupervisedDataset.__getitem__``):
    ``input_ids`` [seq] and ``labels`` [seq] (IGNORE_INDEX except assistant replies and their end of
    turn), ``pixel_values`` [n_images, 3, H, W] only for samples with images (``image_sizes`` too if the
    processor gives them), ``frame_features`` [frames, patches, dim] and ``frame_features_mask`` [n_images]
    for a video given as a features file (its frames are then not in ``pixel_values``),
    ``video_frame_mask`` [n_images] with videos, ``instruction_input_ids`` /
    ``instruction_attention_mask`` [n_images, L] for LLaMA-VID, and the counters of
    ``llava_voco.train.collator.BATCH_STAT_KEYS`` as ints.
    A sample that is skipped (bad with ``--skip_bad_samples``, or too long) is ``skipped_item()``: its
    counters only. The collator leaves it out of the batch, so no other sample takes its place and none
    appears twice in an epoch (nor in a batch of the other modality).

Batches and their counters: ``llava_voco.train.collator``; samplers: ``llava_voco.train.samplers``.

Truncation never cuts an image block or its VoCo tokens, and no partial answer is learned: a sample
whose last image block would end beyond ``model_max_length`` is skipped; text after it is cut at the
last round that fits, else at ``model_max_length``, where the labels of the reply the cut falls in are
dropped (learning its first words without its end of turn would teach the model to stop mid-answer);
a sample left with no whole reply is skipped. Skips, cuts and dropped replies are logged with the
sample id and counted.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from ..conversation import GPT, HUMAN, ConversationError, RenderedConversation, get_template
from ..image_io import ImageReadError, check_image, load_image, pad_to_square
from ..model import image_inputs
from ..model.projectors import projector_for
from ..video import VideoError, check_video, count_frames, decode_video, is_frame_features, read_frame_features
from .arguments import DataArguments
from .collator import DataCollatorForSupervisedDataset, skipped_item

logger = logging.getLogger(__name__)

# Per-image inputs the processor may give (video frames, LLaMA-VID instructions), collated across the batch.
PER_IMAGE_KEYS = ("video_frame_mask", "instruction_input_ids", "instruction_attention_mask")
# Precomputed frames of a video given as a features file, in place of their pixels (VoCoLlavaModel.forward).
FRAME_FEATURE_KEYS = ("frame_features", "frame_features_mask")
# The check before training (--check_samples): threads waiting on file headers, each taking samples in chunks.
CHECK_THREADS = min(32, 4 * (os.cpu_count() or 1))
CHECK_CHUNK = 256


class DataError(ValueError):
    """A sample that cannot be used, with where it is and why.

    Built from one message alone too: torch's DataLoader re-raises a worker's exception as its type called
    with the worker's traceback as text (``sample_error_line`` finds the sample's line in it)."""

    def __init__(self, data_path: str, index: int | None = None, sample_id: Any = None, problem: str | None = None):
        self.data_path, self.index, self.sample_id, self.problem = data_path, index, sample_id, problem
        if problem is None:
            super().__init__(data_path)
        else:
            super().__init__(f"{data_path}: {describe_sample(index, sample_id)}: {problem}")


def describe_sample(index: int, sample_id: Any) -> str:
    return f"sample id {sample_id!r} (index {index})"


class BadSamplesError(DataError):
    """The bad samples the check before training found (``--check_samples``), in one line: how many, the
    first few, and the flag that skips them."""

    SHOWN = 3  # bad samples named in the message

    def __init__(self, data_path: str, errors: list[DataError], total: int):
        self.errors = errors
        named = "; ".join(f"{describe_sample(e.index, e.sample_id)}: {e.problem}" for e in errors[: self.SHOWN])
        more = f"; and {len(errors) - self.SHOWN} more" if len(errors) > self.SHOWN else ""
        super().__init__(
            f"{data_path}: {len(errors)} of {total} samples cannot be used: {named}{more} "
            "(fix or remove them, or pass --skip_bad_samples True to train without them)"
        )


def sample_error_line(error: DataError) -> str:
    """The one line that names the sample, also for an error torch re-raised from a DataLoader worker (whose
    message is "Caught DataError in DataLoader worker process 0" followed by the worker's traceback)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    prefix = f"{DataError.__module__}.{DataError.__name__}: "
    for line in reversed(lines):
        if line.startswith(prefix):
            return line.removeprefix(prefix)
    return " ".join(line.strip() for line in lines)


class _TooLong(Exception):
    """The sample's image blocks (or every whole reply) do not fit in model_max_length: skipped, not an error."""

    def __init__(self, message: str, replies_dropped: int = 0):
        super().__init__(message)
        self.replies_dropped = replies_dropped


@dataclass
class _PreparedSample:
    sample_id: Any
    image_files: list[str]
    rendered: RenderedConversation
    video_file: str | None = None
    turns: list = field(default_factory=list)


def load_samples(data_path: str) -> list:
    """A JSON list, or JSONL (one sample per line), told apart by the first character."""
    with open(data_path, encoding="utf-8") as handle:
        content = handle.read()
    if content.lstrip().startswith("["):
        try:
            return json.loads(content)
        except json.JSONDecodeError as error:
            raise ValueError(f"{data_path}: not valid JSON: {error}") from None
    samples = []
    for line_number, line in enumerate(content.splitlines(), start=1):
        if line.strip():
            try:
                samples.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{data_path}: line {line_number} is not valid JSON: {error}") from None
    return samples


def _image_files(sample) -> list:
    """The sample's ``image`` as a list (a malformed entry stays in it, for ``_prepare`` to report)."""
    files = sample.get("image") if isinstance(sample, dict) else None
    if files is None:
        return []
    return files if isinstance(files, list) else [files]


def _video_file(sample):
    return sample.get("video") if isinstance(sample, dict) else None


def _word_count(sample) -> int:
    conversations = sample.get("conversations") if isinstance(sample, dict) else None
    if not isinstance(conversations, list):
        return 0
    return sum(len(str(turn.get("value", "")).split()) for turn in conversations if isinstance(turn, dict))


def _image_per_turn(turns: list, position: int) -> list:
    """LLaMA-VID's ``imgsp_v1``: every human turn after the one that shows the image shows it again, at its start
    or its end (drawn per sample and turn, fixed across epochs; LLaMA-VID draws anew each time), so that each copy's
    context token is guided by its own turn's question."""
    draw = random.Random(position)
    shown, out = False, []
    for role, value in turns:
        if role == HUMAN and shown and IMAGE_PLACEHOLDER not in value:
            value = IMAGE_PLACEHOLDER + "\n" + value if draw.randint(0, 1) == 0 else value + "\n" + IMAGE_PLACEHOLDER
        shown = shown or IMAGE_PLACEHOLDER in value
        out.append((role, value))
    return out


class LazySupervisedDataset(Dataset):
    """LLaVA's samples, rendered with a ``--version`` template and processed one at a time.

    ``stats`` (a ``Counter``) counts, in this process: ``items``, ``skipped_bad``, ``skipped_too_long``,
    ``truncated``, ``replies_dropped``, ``vision_tokens``, ``voco_tokens`` (and, for an elastic model,
    ``items_with_voco_tokens_<k>``: each draw's VoCo count is drawn from ``processor.voco_token_choices``).
    A sample skipped when drawn
    is ``skipped_item()`` (left out of its batch by the collator, with nothing in its place); it is
    counted each time it is drawn.

    ``vision_hidden_size``: the model's vision tower width, so that a features file of another width is
    refused here, naming the sample and file (the model would refuse it too, without naming them).
    """

    def __init__(
        self,
        data_path: str,
        processor,
        data_args: DataArguments,
        *,
        version: str,
        model_max_length: int,
        vision_hidden_size: int | None = None,
    ):
        if model_max_length is None or model_max_length < 1:
            raise ValueError(f"model_max_length must be a positive number of tokens, got {model_max_length}")
        if not getattr(processor.tokenizer, "is_fast", False):
            raise ValueError("the data pipeline labels tokens by their character offsets: it needs a fast tokenizer")
        self.data_path = str(data_path)
        self.processor = processor
        self.data_args = data_args
        self.template = get_template(version)
        self.model_max_length = model_max_length
        self.vision_hidden_size = vision_hidden_size
        self.image_token_id = processor.image_token_id
        self.voco_token_id = getattr(processor, "voco_token_id", None)
        self.voco_token = getattr(processor, "voco_token", None)
        choices = getattr(processor, "voco_token_choices", None)  # elastic k: one count drawn per sample and draw
        self.voco_token_choices = list(choices) if choices and len(choices) > 1 else None
        self.stats: Counter = Counter()
        self.samples = load_samples(self.data_path)
        self._indices = list(range(len(self.samples)))  # positions in the file, after up-front skips
        self._cache: dict | None = {} if data_args.cache_samples else None  # position (elastic: (position, k)) -> built item
        self._skipped: set[int] = set()  # positions skipped when drawn, in this process
        self._frame_counts: dict[int, int] = {}  # position -> frames of its video (lengths)
        if data_args.check_samples:
            self._check_all()
        if not self._indices:
            raise ValueError(f"{self.data_path}: no usable samples")

    # ---- lengths for --group_by_modality_length, from the JSON alone ------------------------------

    @property
    def tokens_per_image(self) -> int:
        """Image tokens plus VoCo tokens one image becomes, without an image (``tokens_per_image`` of the
        processor: the count the processor and the model use)."""
        return image_inputs.tokens_per_image(self.processor).total

    @property
    def tokens_per_frame(self) -> int:
        """The same for one video frame (LLaMA-VID pools frames with its video compress type)."""
        return image_inputs.tokens_per_image(self.processor, is_frame=True).total

    def _frames(self, position: int) -> int:
        """The frames a sample's video gives (``video.count_frames``: headers only, sampled as loading samples
        them). A video that cannot be read (loading reports it) counts as ``--max_frames``, or none without it."""
        name = _video_file(self.samples[position])
        if name is None:
            return 0
        if position not in self._frame_counts:
            try:
                path = self._video_path(position, self.samples[position].get("id"), name)
                self._frame_counts[position] = count_frames(path, self.data_args.video_fps, self.data_args.max_frames)
            except (VideoError, ValueError):
                cap = self.data_args.max_frames
                self._frame_counts[position] = cap if cap is not None else 0
        return self._frame_counts[position]

    @property
    def lengths(self) -> list[int]:
        """Estimated tokens per sample: words of the turns plus image and VoCo tokens (as LLaVA estimates), a
        video's frames counted from its headers."""
        per_image, per_frame = self.tokens_per_image, self.tokens_per_frame
        return [
            _word_count(self.samples[i])
            + len(_image_files(self.samples[i])) * per_image
            + self._frames(i) * per_frame
            for i in self._indices
        ]

    @property
    def modality_lengths(self) -> list[int]:
        """``lengths``, negated (and at least 1 in size) for text-only samples: LLaVA's modality sign."""
        return [
            length if _image_files(self.samples[i]) or _video_file(self.samples[i]) else -max(length, 1)
            for i, length in zip(self._indices, self.lengths)
        ]

    def __len__(self) -> int:
        return len(self._indices)

    # ---- checking and rendering ------------------------------------------------------------------

    def _error(self, position: int, sample_id: Any, problem: str) -> DataError:
        return DataError(self.data_path, position, sample_id, problem)

    def _prepare(self, position: int) -> _PreparedSample:
        """Structure of one sample, without opening its images; raises DataError."""
        sample = self.samples[position]
        if not isinstance(sample, dict):
            raise self._error(position, None, f"not a JSON object: {type(sample).__name__}")
        sample_id = sample.get("id", f"#{position}")
        conversations = sample.get("conversations")
        if not isinstance(conversations, list) or not conversations:
            raise self._error(position, sample_id, "no 'conversations' (a non-empty list of turns is required)")
        turns = []
        for number, turn in enumerate(conversations):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise self._error(position, sample_id, f"turn {number} is not an object with 'from' and 'value'")
            if not isinstance(turn["value"], str):
                raise self._error(position, sample_id, f"turn {number} has a non-string 'value'")
            turns.append((turn["from"], turn["value"]))
        image_files = _image_files(sample)
        if not all(isinstance(f, str) and f for f in image_files):
            raise self._error(position, sample_id, f"'image' must be a path or a list of paths, got {sample['image']!r}")
        for number, (role, value) in enumerate(turns):
            if self.voco_token and self.voco_token in value:
                raise self._error(position, sample_id, f"turn {number} contains the reserved VoCo token {self.voco_token!r}")
            if role == GPT and IMAGE_PLACEHOLDER in value:
                raise self._error(position, sample_id, f"turn {number} ({GPT}) contains {IMAGE_PLACEHOLDER}")

        video_file = _video_file(sample)
        if video_file is not None:
            if not isinstance(video_file, str) or not video_file:
                raise self._error(position, sample_id, f"'video' must be a path, got {video_file!r}")
            if self.template.style in ("plain", "voco_official"):
                raise self._error(position, sample_id, f"the {self.template.name!r} template lays out images only, not videos")
            video_placeholders = sum(value.count(VIDEO_PLACEHOLDER) for _, value in turns)
            if video_placeholders == 0 and not image_files and sum(v.count(IMAGE_PLACEHOLDER) for _, v in turns) == 1:
                turns = [(role, value.replace(IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)) for role, value in turns]
                video_placeholders = 1
            if video_placeholders == 0:
                first_human = next((n for n, (role, _) in enumerate(turns) if role == HUMAN), None)
                if first_human is not None:
                    turns[first_human] = (HUMAN, VIDEO_PLACEHOLDER + "\n" + turns[first_human][1])
                    video_placeholders = 1
            if video_placeholders != 1:
                raise self._error(position, sample_id, f"{video_placeholders} {VIDEO_PLACEHOLDER} placeholders for one video")
        elif any(VIDEO_PLACEHOLDER in value for _, value in turns):
            raise self._error(position, sample_id, f"{VIDEO_PLACEHOLDER} in the turns but no 'video' in the sample")
        placeholders = sum(value.count(IMAGE_PLACEHOLDER) for _, value in turns)
        if placeholders == 0 and image_files:
            # As LLaVA does: the images go before the first human turn's text.
            first_human = next((n for n, (role, _) in enumerate(turns) if role == HUMAN), None)
            if first_human is not None:
                turns[first_human] = (HUMAN, (IMAGE_PLACEHOLDER + "\n") * len(image_files) + turns[first_human][1])
                placeholders = len(image_files)
        if placeholders != len(image_files):
            raise self._error(
                position, sample_id,
                f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in the turns but {len(image_files)} image(s) listed",
            )
        if self.data_args.is_multimodal:
            turns = [
                (role, (IMAGE_PLACEHOLDER + "\n" + value.replace(IMAGE_PLACEHOLDER, "").strip()).strip())
                if value.count(IMAGE_PLACEHOLDER) == 1 else (role, value)
                for role, value in turns
            ]
        if self.data_args.image_per_turn and len(image_files) == 1 and video_file is None:
            turns = _image_per_turn(turns, position)
            image_files = image_files * sum(value.count(IMAGE_PLACEHOLDER) for _, value in turns)
        try:
            rendered = self.template.render(turns, len(image_files))
        except ConversationError as error:
            raise self._error(position, sample_id, str(error)) from None
        return _PreparedSample(sample_id, image_files, rendered, video_file, turns)

    def _image_path(self, position: int, sample_id: Any, name: str) -> str:
        if self.data_args.image_folder is None and not os.path.isabs(name):
            raise ValueError(
                f"{self.data_path}: sample id {sample_id!r} (index {position}) has images but --image_folder is not set"
            )
        return os.path.join(self.data_args.image_folder or "", name)

    def _check_all(self) -> None:
        """``--check_samples``: every sample's structure, and that each of its files opens (headers only), before
        training. The bad ones are refused together (``BadSamplesError``), or with ``--skip_bad_samples``
        dropped, counted and logged. The file reads run in a thread pool, in chunks of samples: on a network
        file system the time goes to waiting on each file's first bytes."""
        started = time.perf_counter()
        chunks = [self._indices[k : k + CHECK_CHUNK] for k in range(0, len(self._indices), CHECK_CHUNK)]
        with ThreadPoolExecutor(max_workers=CHECK_THREADS) as pool:
            results = [result for chunk in pool.map(self._check_chunk, chunks) for result in chunk]
        errors = [error for _, error in results if error is not None]
        logger.info("checked %d samples of %s in %.1f s: %d bad", len(results), self.data_path,
                    time.perf_counter() - started, len(errors))
        if errors and not self.data_args.skip_bad_samples:
            raise BadSamplesError(self.data_path, errors, len(self.samples))
        for error in errors:
            self._count_bad(error)
        if errors:
            logger.warning("%s: skipped %d of %d samples as bad (--skip_bad_samples)", self.data_path, len(errors),
                           len(self.samples))
        self._indices = [position for position, error in results if error is None]

    def _check_chunk(self, positions: list[int]) -> list[tuple[int, DataError | None]]:
        return [(position, self._check_sample(position)) for position in positions]

    def _check_sample(self, position: int) -> DataError | None:
        """The sample's problem, or None: its structure (``_prepare``), then each image and its video open."""
        try:
            prepared = self._prepare(position)
            for name in prepared.image_files:
                path = self._image_path(position, prepared.sample_id, name)
                if not os.path.isfile(path):
                    raise self._error(position, prepared.sample_id, f"missing image file {path}")
                try:
                    check_image(path)
                except ImageReadError as error:
                    raise self._error(position, prepared.sample_id, f"unreadable image file {error}") from None
            if prepared.video_file:
                self._check_video(position, prepared.sample_id, prepared.video_file)
        except DataError as error:
            return error
        return None

    def _check_video(self, position: int, sample_id: Any, name: str) -> None:
        path = self._video_path(position, sample_id, name)
        if not os.path.exists(path):
            raise self._error(position, sample_id, f"missing video {path}")
        if is_frame_features(path):
            self._read_frame_features(position, sample_id, path, max_frames=1)  # its header and first frame
            return
        try:
            check_video(path)
        except VideoError as error:
            raise self._error(position, sample_id, str(error)) from None

    def _load_image(self, position: int, sample_id: Any, name: str) -> Image.Image:
        path = self._image_path(position, sample_id, name)
        if not os.path.isfile(path):
            raise self._error(position, sample_id, f"missing image file {path}")
        try:
            image = load_image(path)
        except ImageReadError as error:
            raise self._error(position, sample_id, f"unreadable image file {error}") from None
        if self.data_args.image_aspect_ratio == "pad":
            image = pad_to_square(image, self.processor.image_processor)
        return image

    def _video_path(self, position: int, sample_id: Any, name: str) -> str:
        folder = self.data_args.video_folder or self.data_args.image_folder
        if folder is None and not os.path.isabs(name):
            raise ValueError(
                f"{self.data_path}: sample id {sample_id!r} (index {position}) has a video but neither "
                "--video_folder nor --image_folder is set"
            )
        return os.path.join(folder or "", name)

    def _load_video(self, position: int, sample_id: Any, name: str) -> list[Image.Image] | torch.Tensor:
        """The frames, or for a features file its precomputed frames ``[frames, patches, dim]``."""
        path = self._video_path(position, sample_id, name)
        if not os.path.exists(path):
            raise self._error(position, sample_id, f"missing video {path}")
        if is_frame_features(path):
            return self._read_frame_features(position, sample_id, path, self.data_args.max_frames)
        try:
            frames = decode_video(path, fps=self.data_args.video_fps, max_frames=self.data_args.max_frames)
        except VideoError as error:
            raise self._error(position, sample_id, str(error)) from None
        if self.data_args.image_aspect_ratio == "pad":
            frames = [pad_to_square(frame, self.processor.image_processor) for frame in frames]
        return frames

    def _read_frame_features(self, position: int, sample_id: Any, path: str, max_frames: int | None) -> torch.Tensor:
        try:
            features = read_frame_features(path, max_frames, width=self.vision_hidden_size)
            return self.processor.check_frame_features(features)
        except VideoError as error:
            raise self._error(position, sample_id, str(error)) from None
        except ValueError as error:
            raise self._error(position, sample_id, f"{path}: {error}") from None

    def _instructions(self, turns: list) -> list[str] | None:
        """LLaMA-VID reads, for each image or video, the human turn that shows it (placeholders removed; newlines
        deleted without a space unless ``--keep_instruction_newlines``, as LLaMA-VID's ``preprocess_imgsp_v1``)."""
        if not projector_for(self.processor).reads_instruction:
            return None
        placeholder = re.compile(f"{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)}")
        instructions = []
        for role, value in turns:
            text = placeholder.sub("", value)
            text = (text if self.data_args.keep_instruction_newlines else text.replace("\n", "")).strip()
            instructions.extend([text] * len(placeholder.findall(value)))
        return instructions

    # ---- items ----------------------------------------------------------------------------------

    def _draw_voco_tokens(self) -> int | None:
        """Elastic k's count for one draw of a sample, from torch's generator (seeded by the Trainer, and per
        dataloader worker and epoch by the DataLoader); None when the model has one count."""
        if self.voco_token_choices is None:
            return None
        return self.voco_token_choices[int(torch.randint(len(self.voco_token_choices), ()))]

    def _build(self, position: int, voco_tokens: int | None = None) -> dict:
        prepared = self._prepare(position)
        images = [self._load_image(position, prepared.sample_id, name) for name in prepared.image_files]
        frames = self._load_video(position, prepared.sample_id, prepared.video_file) if prepared.video_file else None
        rendered = prepared.rendered
        media = {"videos": [frames]} if frames is not None else {}
        instructions = self._instructions(prepared.turns)
        if instructions is not None:
            media["instructions"] = instructions
        if voco_tokens is not None:
            media["voco_tokens"] = voco_tokens
        encoded = self.processor(
            images=images or None,
            text=[rendered.text],
            return_offsets_mapping=True,
            return_text_replacement_offsets=True,
            return_tensors="pt",
            **media,
        )
        input_ids = encoded["input_ids"][0]  # [seq]
        offsets = encoded.get("offset_mapping")
        if offsets is None or not bool(offsets[0][:, 1].any()):
            raise ValueError(
                f"the tokenizer ({type(self.processor.tokenizer).__name__}) gives no character offsets, and the "
                "data pipeline places the labels by them (every reply would go unlearned): use a tokenizer "
                "whose offset_mapping is filled in (a fast tokenizer from tokenizers)"
            )
        offsets = offsets[0]  # [seq, 2] character span of each token in the expanded text
        replacements = encoded["text_replacement_offsets"][0]

        def expanded(char: int) -> int:
            """A character offset of the rendered text, in the text with each <image> expanded."""
            return char + sum(
                (r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0])
                for r in replacements
                if r["span"][1] <= char
            )

        token_start, token_end = offsets[:, 0], offsets[:, 1]  # [seq]
        is_image_block = input_ids == self.image_token_id
        if self.voco_token_id is not None:
            is_image_block |= input_ids == self.voco_token_id
        replies = [  # [seq] each, the tokens one reply (and its end of turn) teaches
            (token_end > expanded(start)) & (token_start < expanded(end)) & ~is_image_block
            for start, end in rendered.target_spans
        ]
        learned = torch.stack(replies).any(dim=0) if replies else torch.zeros_like(input_ids, dtype=torch.bool)
        labels = torch.where(learned, input_ids, IGNORE_INDEX)  # [seq]

        truncated = replies_dropped = 0
        if len(input_ids) > self.model_max_length:
            where = f"{self.data_path}: sample id {prepared.sample_id!r} (index {position})"
            cut = self._cut_point(where, input_ids, labels, is_image_block, token_end, rendered, expanded)
            input_ids, labels, truncated = input_ids[:cut], labels[:cut].clone(), 1
            replies_dropped = self._drop_cut_replies(where, labels, [reply[:cut] for reply in replies], replies)

        item = {"input_ids": input_ids, "labels": labels}
        if images or frames is not None:
            # pixel_values [images with pixels (video frames included unless precomputed), 3, H, W]
            for key in ("pixel_values", "image_sizes", *FRAME_FEATURE_KEYS, *PER_IMAGE_KEYS):
                if key in encoded:
                    item[key] = encoded[key]
        item["num_vision_tokens"] = int((input_ids == self.image_token_id).sum())
        item["num_voco_tokens"] = int((input_ids == self.voco_token_id).sum()) if self.voco_token_id is not None else 0
        item["num_samples_truncated"] = truncated
        item["num_replies_dropped"] = replies_dropped
        return item

    def _cut_point(self, where, input_ids, labels, is_image_block, token_end, rendered, expanded) -> int:
        """Where to cut a sample longer than model_max_length; raises _TooLong when nothing usable fits."""
        limit = self.model_max_length
        block_positions = is_image_block.nonzero().flatten()
        image_end = int(block_positions[-1]) + 1 if len(block_positions) else 0
        if image_end > limit:
            raise _TooLong(
                f"{where}: skipped, its image tokens and VoCo tokens end at token {image_end}, beyond "
                f"model_max_length={limit} ({len(input_ids)} tokens in all)"
            )
        has_label = (labels != IGNORE_INDEX).cumsum(0)  # [seq] labelled tokens up to and including each
        boundaries = []
        for char in rendered.round_ends:
            before = ((token_end <= expanded(char)) & (token_end > 0)).nonzero().flatten()
            if len(before):
                boundaries.append(int(before[-1]) + 1)
        fitting = [b for b in boundaries if image_end <= b <= limit and has_label[b - 1] > 0]
        if fitting:
            cut = max(fitting)
            logger.warning("%s: %d tokens, cut after round %d at token %d (model_max_length=%d)",
                           where, len(input_ids), boundaries.index(cut) + 1, cut, limit)
        elif has_label[limit - 1] > 0:
            cut = limit
            logger.warning("%s: %d tokens, no round ends after the images and within model_max_length=%d: "
                           "cut at model_max_length", where, len(input_ids), limit)
        else:
            raise _TooLong(f"{where}: skipped, no reply token within model_max_length={limit}")
        return cut

    def _drop_cut_replies(self, where: str, labels: torch.Tensor, kept: list, whole: list) -> int:
        """Unlabel (in place) each reply the cut falls inside, so no partial answer is learned; returns how many.
        ``kept``: each reply's tokens before the cut; ``whole``: all of them. Raises _TooLong when no whole
        reply is left."""
        dropped = 0
        for reply_number, (before_cut, reply) in enumerate(zip(kept, whole), start=1):
            if bool(before_cut.any()) and int(before_cut.sum()) < int(reply.sum()):
                labels[before_cut] = IGNORE_INDEX
                dropped += 1
                logger.warning("%s: model_max_length=%d cuts reply %d: labels of the reply it cuts dropped",
                               where, self.model_max_length, reply_number)
        self.stats["replies_dropped"] += dropped
        if not bool((labels != IGNORE_INDEX).any()):
            raise _TooLong(
                f"{where}: skipped, no whole reply within model_max_length={self.model_max_length} (a reply cut "
                "by it is not learned)", replies_dropped=dropped,
            )
        self.stats["truncated"] += 1
        return dropped

    def _count_bad(self, error: DataError) -> None:
        self.stats["skipped_bad"] += 1
        logger.warning("skipping bad sample: %s", error)

    def _cached_build(self, position: int, voco_tokens: int | None = None) -> dict:
        """``_build``, from ``--cache_samples``'s cache when on (samples that fail are not cached; an elastic
        model's sample once per VoCo count)."""
        if self._cache is None:
            return self._build(position, voco_tokens)
        key = position if voco_tokens is None else (position, voco_tokens)
        if key not in self._cache:
            self._cache[key] = self._build(position, voco_tokens)
        return dict(self._cache[key])  # a copy: the counters added below are per draw

    def __getitem__(self, index: int) -> dict:
        """The item of sample ``index``, or ``skipped_item()`` (counted and logged) when it is skipped."""
        position = self._indices[index]
        skipped = skipped_item()
        voco_tokens = self._draw_voco_tokens()
        try:
            item = self._cached_build(position, voco_tokens)
        except _TooLong as reason:
            self.stats["skipped_too_long"] += 1
            skipped["num_replies_dropped"] = reason.replies_dropped
            logger.warning("%s", reason)
        except DataError as error:
            if not self.data_args.skip_bad_samples:
                raise
            self._count_bad(error)
        else:
            item["num_samples_skipped"] = 0
            self.stats["items"] += 1
            self.stats["vision_tokens"] += item["num_vision_tokens"]
            self.stats["voco_tokens"] += item["num_voco_tokens"]
            if voco_tokens is not None and item["num_voco_tokens"]:  # text-only samples have no VoCo run
                self.stats[f"items_with_voco_tokens_{voco_tokens}"] += 1
            return item
        self._skipped.add(position)
        if len(self._skipped) == len(self._indices):
            raise RuntimeError(f"{self.data_path}: every sample was skipped (see the warnings above)")
        return skipped


def make_supervised_data_module(
    processor, data_args: DataArguments, *, version: str, model_max_length: int, vision_hidden_size: int | None = None
) -> dict:
    """Dataset and collator for the Trainer, as LLaVA's function of the same name returns them
    (``vision_hidden_size``: see ``LazySupervisedDataset``)."""
    if not data_args.data_path:
        raise ValueError("--data_path is required")
    if processor.tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token; set one before building the data module "
            "(LLaVA uses the unk token: tokenizer.pad_token = tokenizer.unk_token)"
        )
    instruction_pad_token_id = None
    if projector_for(processor).reads_instruction:
        text_decoder_tokenizer = getattr(processor, "text_decoder_tokenizer", None)
        if text_decoder_tokenizer is None:
            raise ValueError(
                f"the processor's projector ({processor.mm_projector_type}) reads each image's instruction, but it has "
                "no text_decoder_tokenizer to tokenize them with"
            )
        if text_decoder_tokenizer.pad_token_id is None:
            raise ValueError("LLaMA-VID's text decoder tokenizer has no pad token; set one (BERT's is [PAD])")
        instruction_pad_token_id = text_decoder_tokenizer.pad_token_id
    dataset = LazySupervisedDataset(
        data_args.data_path, processor, data_args, version=version, model_max_length=model_max_length,
        vision_hidden_size=vision_hidden_size,
    )
    collator = DataCollatorForSupervisedDataset(
        tokenizer=processor.tokenizer, label_pad_token_id=IGNORE_INDEX, instruction_pad_token_id=instruction_pad_token_id,
        packed_row_length=model_max_length if data_args.packing else None,
    )
    return {"train_dataset": dataset, "eval_dataset": None, "data_collator": collator}


__all__ = [
    "BadSamplesError",
    "DataArguments",
    "DataError",
    "LazySupervisedDataset",
    "load_samples",
    "make_supervised_data_module",
    "sample_error_line",
]
