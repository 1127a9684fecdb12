"""LLaVA's conversation templates (``--version``), rendered with the character spans that are learned.

Each template reproduces the prompt string LLaVA builds for training with that ``--version`` name
(system prompt, role tags, separators, where the image placeholder goes), so a model fine-tuned here
sees the same text as one fine-tuned with LLaVA's scripts. Rendering returns, besides the text, the
character spans of every assistant reply together with its end-of-turn string: those characters are
the only ones learned. Labelling by characters (then mapping to tokens through the tokenizer's
offsets) gives exact labels for any tokenizer, where counting tokens of pieces would not.

Where a template departs from LLaVA, the template's docstring line says how.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .constants import IMAGE_PLACEHOLDER

HUMAN, GPT = "human", "gpt"


class ConversationError(ValueError):
    """The turns cannot be rendered with this template (order of roles, empty reply, ...)."""


class UnknownTemplateError(ValueError):
    """``--version`` names no template here."""


@dataclass
class RenderedConversation:
    """A rendered prompt and, in character offsets of ``text``, what is learned and where rounds end."""

    text: str
    target_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of reply + end of turn
    round_ends: list[int] = field(default_factory=list)  # offset just after each round (a clean cut point)

    @property
    def targets(self) -> list[str]:
        return [self.text[start:end] for start, end in self.target_spans]


class _Builder:
    """Appends text pieces and records which of them are learned."""

    def __init__(self):
        self.pieces: list[str] = []
        self.length = 0
        self.spans: list[tuple[int, int]] = []
        self.round_ends: list[int] = []

    def add(self, text: str, learned: bool = False) -> None:
        if learned and text:
            if self.spans and self.spans[-1][1] == self.length:  # extend a span that ends right here
                self.spans[-1] = (self.spans[-1][0], self.length + len(text))
            else:
                self.spans.append((self.length, self.length + len(text)))
        self.pieces.append(text)
        self.length += len(text)

    def end_round(self) -> None:
        self.round_ends.append(self.length)

    def result(self) -> RenderedConversation:
        return RenderedConversation("".join(self.pieces), self.spans, self.round_ends)


def check_turns(turns: Sequence[tuple[str, str]]) -> None:
    """Turns must alternate human, gpt, human, gpt, ... and every reply must have text."""
    if not turns:
        raise ConversationError("no turns")
    for index, (role, value) in enumerate(turns):
        expected = HUMAN if index % 2 == 0 else GPT
        if role != expected:
            raise ConversationError(
                f"roles out of order: turn {index} is from {role!r}, expected {expected!r} "
                f"(turns must alternate {HUMAN!r}, {GPT!r}, starting with {HUMAN!r})"
            )
        if not isinstance(value, str):
            raise ConversationError(f"turn {index} ({role}) has a non-string value: {value!r}")
        if role == GPT and not value.strip():
            raise ConversationError(f"empty assistant turn: turn {index} ({GPT}) has no text")
    if turns[-1][0] != GPT:
        raise ConversationError(
            f"roles out of order: the last turn (turn {len(turns) - 1}) is from {HUMAN!r} and has no "
            f"{GPT!r} reply to learn"
        )


@dataclass(frozen=True)
class ConversationTemplate:
    """One ``--version``: its style, system prompt and separators.

    Styles (LLaVA's ``SeparatorStyle``):
      * ``plain``: ``<image>`` per image, then the caption, then ``sep``; the human text is dropped
        (LLaVA's pretraining). One human and one gpt turn only.
      * ``two``: ``system + sep``, then ``ROLE: message`` followed by ``sep`` after human turns and
        ``sep2`` after gpt turns (Vicuna v1).
      * ``llama_2``: ``[INST] <<SYS>>...<</SYS>> question [/INST] answer </s>``, rounds joined by ``sep``.
      * ``mpt``: ChatML with ``sep`` = ``<|im_end|>`` and no newline between turns (as LLaVA writes it).
      * ``llama_3``: Llama 3's header/eot layout, messages stripped, as LLaVA-NeXT builds it.
      * ``voco_official``: ``two`` laid out as the released VoCo-LLaMA code does (see ``render``).
    """

    name: str
    style: str
    system: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = ""
    sep2: str = ""

    def render(self, turns: Sequence[tuple[str, str]], num_images: int = 0) -> RenderedConversation:
        """Render ``turns`` (``(role, text)`` with role ``"human"`` / ``"gpt"``).

        ``num_images`` is only read by the layouts that place the images themselves (``plain``,
        ``voco_official``); the other templates keep the ``<image>`` placeholders where the text has them.
        """
        check_turns(turns)
        render = getattr(self, f"_render_{self.style}")
        return render(list(turns), num_images)

    def _render_plain(self, turns, num_images):
        if len(turns) != 2:
            raise ConversationError(
                f"the {self.name!r} template (pretraining) takes one {HUMAN!r} and one {GPT!r} turn, got {len(turns)} turns"
            )
        out = _Builder()
        out.add(self.system + IMAGE_PLACEHOLDER * num_images)
        out.add(turns[1][1] + self.sep, learned=True)
        out.end_round()
        return out.result()

    def _render_two(self, turns, num_images):
        out = _Builder()
        out.add(self.system + self.sep)
        for index in range(0, len(turns), 2):
            out.add(f"{self.roles[0]}: {turns[index][1]}{self.sep}{self.roles[1]}:")
            # The space after "ASSISTANT:" is learned: a reply is generated from a prompt that ends at the
            # colon, and with a digit-splitting tokenizer (LLaMA's) " 7" is two tokens, "▁" then "7".
            out.add(" " + turns[index + 1][1] + self.sep2, learned=True)
            out.end_round()
        return out.result()

    def _render_voco_official(self, turns, num_images):
        """The released VoCo-LLaMA code's layout: ``<image>\\n`` per image first, then the ``two`` prompt
        with every ``<image>`` and newline removed from it (that code strips them). The code also writes
        ``\\n`` between the image and its VoCo tokens; here the processor puts the VoCo tokens right after
        the image tokens (the layout the model's mask reads), so that one newline is absent.
        Text-only samples are left as ``two`` renders them, as that code does."""
        if num_images == 0:
            return self._render_two(turns, num_images)
        cleaned = [(role, text.replace(IMAGE_PLACEHOLDER, "").replace("\n", "")) for role, text in turns]
        for index, (role, text) in enumerate(cleaned):
            if role == GPT and not text.strip():
                raise ConversationError(f"empty assistant turn: turn {index} ({GPT}) is empty once newlines are removed")
        body = self._render_two(cleaned, num_images)
        prefix = (IMAGE_PLACEHOLDER + "\n") * num_images
        shift = len(prefix)
        return RenderedConversation(
            prefix + body.text,
            [(start + shift, end + shift) for start, end in body.target_spans],
            [end + shift for end in body.round_ends],
        )

    def _render_llama_2(self, turns, num_images):
        out = _Builder()
        for index in range(0, len(turns), 2):
            question = turns[index][1]
            if index == 0 and self.system:
                question = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{question}"
            # LLaVA strips the leading separator of the first round.
            out.add(("" if index == 0 else self.sep) + f"[INST] {question} [/INST]")
            out.add(f" {turns[index + 1][1]} {self.sep2}", learned=True)  # the space learned, as in _render_two
            out.end_round()
        return out.result()

    def _render_mpt(self, turns, num_images):
        out = _Builder()
        out.add(self.system + self.sep)
        for index in range(0, len(turns), 2):
            out.add(self.roles[0] + turns[index][1] + self.sep + self.roles[1])
            out.add(turns[index + 1][1] + self.sep, learned=True)
            out.end_round()
        return out.result()

    def _render_llama_3(self, turns, num_images):
        """LLaVA-NeXT learns the whole assistant message including its header and also every header and
        ``\\n\\n`` token; here only the reply and its ``<|eot_id|>`` are learned, like every other template."""

        def header(role: str) -> str:
            return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

        out = _Builder()
        out.add(header("system") + self.system + self.sep)
        for index in range(0, len(turns), 2):
            out.add(header(self.roles[0]) + turns[index][1].strip() + self.sep + header(self.roles[1]))
            out.add(turns[index + 1][1].strip() + self.sep, learned=True)
            out.end_round()
        return out.result()


_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_VOCO_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant of the image. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
    "content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)
_LLAVA_SYSTEM = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
_CHATML_USER, _CHATML_ASSISTANT = "<|im_start|>user\n", "<|im_start|>assistant\n"

_DEFINITIONS = [
    ConversationTemplate("plain", "plain", sep="\n"),
    ConversationTemplate("v1", "two", _VICUNA_SYSTEM, sep=" ", sep2="</s>"),
    ConversationTemplate("llava_v1", "two", _LLAVA_V1_SYSTEM, sep=" ", sep2="</s>"),
    ConversationTemplate("llama_2", "llama_2", _LLAMA_2_SYSTEM, sep="<s>", sep2="</s>"),
    ConversationTemplate("llava_llama_2", "llama_2", _LLAVA_SYSTEM, sep="<s>", sep2="</s>"),
    ConversationTemplate("mistral_instruct", "llama_2", "", sep="", sep2="</s>"),
    ConversationTemplate(
        "chatml_direct", "mpt", "<|im_start|>system\nAnswer the questions.", (_CHATML_USER, _CHATML_ASSISTANT),
        sep="<|im_end|>",
    ),
    ConversationTemplate(
        "mpt", "mpt",
        "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
        "The assistant gives helpful and honest answers.",
        (_CHATML_USER, _CHATML_ASSISTANT), sep="<|im_end|>",
    ),
    ConversationTemplate("llama_3", "llama_3", _LLAVA_SYSTEM, ("user", "assistant"), sep="<|eot_id|>"),
    ConversationTemplate("voco_official", "voco_official", _VOCO_SYSTEM, sep=" ", sep2="</s>"),
]
# LLaVA's other names for the same templates.
_ALIASES = {"vicuna_v1": "v1", "v0_plain": "plain", "mistral_direct": "chatml_direct"}

TEMPLATES: dict[str, ConversationTemplate] = {template.name: template for template in _DEFINITIONS}
TEMPLATES.update({alias: TEMPLATES[target] for alias, target in _ALIASES.items()})


def get_template(version: str) -> ConversationTemplate:
    """The template for LLaVA's ``--version`` name; a clear error listing the names otherwise."""
    try:
        return TEMPLATES[version]
    except KeyError:
        raise UnknownTemplateError(
            f"unknown conversation template --version {version!r}; known: {', '.join(sorted(TEMPLATES))}"
        ) from None


__all__ = [
    "IMAGE_PLACEHOLDER",
    "TEMPLATES",
    "ConversationError",
    "ConversationTemplate",
    "RenderedConversation",
    "UnknownTemplateError",
    "check_turns",
    "get_template",
]
