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

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Sequence

from .constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

HUMAN, GPT = "human", "gpt"


LLAMA_2_MARKERS = ("[INST]", "[/INST]")  # a llama_2 round: "[INST] question [/INST] answer </s>"


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


def check_turns(turns: Sequence[tuple[str, str]], add_generation_prompt: bool = False) -> None:
    """Turns must alternate human, gpt, human, gpt, ... and every reply must have text; they end with a gpt
    turn (a sample to learn from) or, with ``add_generation_prompt``, with the human turn to answer."""
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
    if add_generation_prompt and turns[-1][0] != HUMAN:
        raise ConversationError(
            f"roles out of order: the last turn (turn {len(turns) - 1}) is from {GPT!r}; a prompt for the next "
            f"reply ends with a {HUMAN!r} turn"
        )
    if not add_generation_prompt and turns[-1][0] != GPT:
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
    # text the processor writes between an image's tokens and its VoCo tokens (VoCoLlavaProcessor.voco_separator)
    voco_separator: str = ""

    def turn_markers(self) -> tuple[str, ...]:
        """The strings this template writes to open or close a turn (role tags, ``[INST]``, end-of-turn
        separators): the roles' marks that chat turns are split at, and that the DigitGrid demo writes into its
        tokenizer's corpus."""
        if self.style in ("two", "voco_official"):
            return tuple(f"{role}:" for role in self.roles)
        if self.style == "llama_2":
            return LLAMA_2_MARKERS
        if self.style == "mpt":
            return (*self.roles, self.sep)
        if self.style == "llama_3":
            return ("<|end_header_id|>", self.sep)
        return ()

    def lay_out_voco(self, processor) -> None:
        """Have ``processor`` lay VoCo runs out as this template does (``voco_official``: ``<image>\\n<voco><voco>``,
        docs/design.md §2.1): it writes ``voco_separator`` between an image's tokens and its VoCo tokens."""
        if hasattr(processor, "voco_separator"):
            processor.voco_separator = self.voco_separator

    def render(self, turns: Sequence[tuple[str, str]], num_images: int = 0,
               add_generation_prompt: bool = False) -> RenderedConversation:
        """Render ``turns`` (``(role, text)`` with role ``"human"`` / ``"gpt"``).

        ``num_images`` is only read by the layouts that place the images themselves (``plain``,
        ``voco_official``); the other templates keep the ``<image>`` placeholders where the text has them.
        With ``add_generation_prompt`` the turns end with a human turn and the text ends where the model's
        reply starts (the prompt inference sends: training's text up to the first learned character, less
        the learned space after the assistant's tag).
        """
        check_turns(turns, add_generation_prompt)
        render = getattr(self, f"_render_{self.style}")
        return render(list(turns), num_images)

    def with_system(self, system: str) -> "ConversationTemplate":
        """This template with another system prompt (a chat's ``system`` message); ChatML keeps its tag."""
        return dataclasses.replace(self, system=self._system_tag + system)

    @property
    def _system_tag(self) -> str:
        return _CHATML_SYSTEM if self.style == "mpt" else ""

    def chat_template(self) -> str:
        """This template as a Jinja chat template (``processor.chat_template``) whose
        ``apply_chat_template(messages)`` is ``render``'s text: what the train entry saves with a checkpoint,
        so that a model is prompted as it was trained. Messages are transformers' (roles ``system`` / ``user``
        / ``assistant``; content a string, or parts ``{"type": "image" | "video" | "text"}``); an image part
        is ``<image>\n`` and a video part ``<video>\n``, where LLaVA's data puts them."""

        def lit(text: str) -> str:  # a Jinja string literal (JSON's escapes are Jinja's)
            return "{{ " + json.dumps(text) + " }}"

        tag = self._system_tag
        parts = (
            "{% for part in message['content'] %}"
            f"{{% if part['type'] == 'image' %}}{lit(IMAGE_PLACEHOLDER + chr(10))}"
            f"{{% elif part['type'] == 'video' %}}{lit(VIDEO_PLACEHOLDER + chr(10))}"
            "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
        )
        content = "{% if message['content'] is string %}{{ message['content'] }}{% else %}" + parts + "{% endif %}"
        head = (
            "{% set ns = namespace(images=0, system=" + json.dumps(self.system) + ") %}"
            "{% for message in messages %}"
            "{% if message['role'] == 'system' %}{% set ns.system = " + json.dumps(tag) + " + message['content'] %}"
            "{% elif message['content'] is not string %}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}{% set ns.images = ns.images + 1 %}"
            "{% endif %}{% endfor %}{% endif %}{% endfor %}"
        )
        loop = "{% for message in messages if message['role'] != 'system' %}{% set text %}" + content + "{% endset %}"
        if self.style == "voco_official":  # the released code's layout, as _render_voco_official
            loop += ("{% if ns.images > 0 %}{% set text = text | replace(" + json.dumps(IMAGE_PLACEHOLDER)
                     + ", '') | replace('\n', '') %}{% endif %}")
        user, assistant = self.roles
        if self.style in ("two", "voco_official"):
            start = "{{ ns.system }}" + lit(self.sep)
            if self.style == "voco_official":
                start = "{{ " + json.dumps(IMAGE_PLACEHOLDER + chr(10)) + " * ns.images }}" + start
            turn = (f"{{% if message['role'] == 'user' %}}{lit(user + ': ')}{{{{ text }}}}{lit(self.sep)}"
                    f"{{% else %}}{lit(assistant + ': ')}{{{{ text }}}}{lit(self.sep2)}{{% endif %}}")
            generation = lit(assistant + ":")
        elif self.style == "llama_2":
            start = ""
            turn = ("{% if message['role'] == 'user' %}{% if loop.first %}"
                    "{% if ns.system %}{% set text = '<<SYS>>\n' + ns.system + '\n<</SYS>>\n\n' + text %}{% endif %}"
                    f"{{% else %}}{lit(self.sep)}{{% endif %}}{lit('[INST] ')}{{{{ text }}}}{lit(' [/INST]')}"
                    f"{{% else %}}{lit(' ')}{{{{ text }}}}{lit(' ' + self.sep2)}{{% endif %}}")
            generation = ""
        elif self.style == "mpt":
            start = "{{ ns.system }}" + lit(self.sep)
            turn = (f"{{% if message['role'] == 'user' %}}{lit(user)}{{% else %}}{lit(assistant)}{{% endif %}}"
                    f"{{{{ text }}}}{lit(self.sep)}")
            generation = lit(assistant)
        elif self.style == "llama_3":
            def header(role: str) -> str:
                return lit(f"<|start_header_id|>{role}<|end_header_id|>\n\n")

            start = header("system") + "{{ ns.system }}" + lit(self.sep)
            turn = (f"{{% if message['role'] == 'user' %}}{header(user)}{{% else %}}{header(assistant)}{{% endif %}}"
                    f"{{{{ text | trim }}}}{lit(self.sep)}")
            generation = header(assistant)
        elif self.style == "plain":
            start = "{{ ns.system }}{{ " + json.dumps(IMAGE_PLACEHOLDER) + " * ns.images }}"
            turn = f"{{% if message['role'] == 'assistant' %}}{{{{ text }}}}{lit(self.sep)}{{% endif %}}"
            generation = ""
        else:  # a new style must say how it renders as a chat template
            raise NotImplementedError(f"no chat template for the {self.style!r} style")
        return (head + start + loop + turn + "{% endfor %}"
                + (f"{{% if add_generation_prompt %}}{generation}{{% endif %}}" if generation else ""))

    def _render_plain(self, turns, num_images):
        if len(turns) not in (1, 2) or (len(turns) == 1 and turns[0][0] != HUMAN):
            raise ConversationError(
                f"the {self.name!r} template (pretraining) takes one {HUMAN!r} and one {GPT!r} turn, got {len(turns)} turns"
            )
        out = _Builder()
        out.add(self.system + IMAGE_PLACEHOLDER * num_images)
        if len(turns) == 2:
            out.add(turns[1][1] + self.sep, learned=True)
            out.end_round()
        return out.result()

    def _render_two(self, turns, num_images):
        out = _Builder()
        out.add(self.system + self.sep)
        for index in range(0, len(turns), 2):
            out.add(f"{self.roles[0]}: {turns[index][1]}{self.sep}{self.roles[1]}:")
            if index + 1 == len(turns):  # the prompt for a reply
                break
            # The space after "ASSISTANT:" is learned: a reply is generated from a prompt that ends at the
            # colon, and with a digit-splitting tokenizer (LLaMA's) " 7" is two tokens, "▁" then "7".
            out.add(" " + turns[index + 1][1] + self.sep2, learned=True)
            out.end_round()
        return out.result()

    def _render_voco_official(self, turns, num_images):
        """The released VoCo-LLaMA code's layout, ``<image>\\n<voco><voco>\\n`` + prompt: ``<image>\\n`` per image
        first, then the ``two`` prompt with every ``<image>`` and newline removed from it (that code strips
        them). The processor expands each ``<image>`` into its tokens, ``voco_separator`` (``\\n``) and its
        VoCo tokens, so the sequence is the released one; ``voco_mask_mode="official"`` reads it
        (docs/design.md §2.2). Text-only samples are left as ``two`` renders them, as that code does."""
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
            opening, closing = LLAMA_2_MARKERS
            out.add(("" if index == 0 else self.sep) + f"{opening} {question} {closing}")
            if index + 1 == len(turns):
                break
            out.add(f" {turns[index + 1][1]} {self.sep2}", learned=True)  # the space learned, as in _render_two
            out.end_round()
        return out.result()

    def _render_mpt(self, turns, num_images):
        out = _Builder()
        out.add(self.system + self.sep)
        for index in range(0, len(turns), 2):
            out.add(self.roles[0] + turns[index][1] + self.sep + self.roles[1])
            if index + 1 == len(turns):
                break
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
            if index + 1 == len(turns):
                break
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
_CHATML_SYSTEM = "<|im_start|>system\n"

_DEFINITIONS = [
    ConversationTemplate("plain", "plain", sep="\n"),
    ConversationTemplate("v1", "two", _VICUNA_SYSTEM, sep=" ", sep2="</s>"),
    ConversationTemplate("llava_v1", "two", _LLAVA_V1_SYSTEM, sep=" ", sep2="</s>"),
    ConversationTemplate("llama_2", "llama_2", _LLAMA_2_SYSTEM, sep="<s>", sep2="</s>"),
    ConversationTemplate("llava_llama_2", "llama_2", _LLAVA_SYSTEM, sep="<s>", sep2="</s>"),
    ConversationTemplate("mistral_instruct", "llama_2", "", sep="", sep2="</s>"),
    ConversationTemplate(
        "chatml_direct", "mpt", _CHATML_SYSTEM + "Answer the questions.", (_CHATML_USER, _CHATML_ASSISTANT),
        sep="<|im_end|>",
    ),
    ConversationTemplate(
        "mpt", "mpt",
        _CHATML_SYSTEM + "A conversation between a user and an LLM-based AI assistant. "
        "The assistant gives helpful and honest answers.",
        (_CHATML_USER, _CHATML_ASSISTANT), sep="<|im_end|>",
    ),
    ConversationTemplate("llama_3", "llama_3", _LLAVA_SYSTEM, ("user", "assistant"), sep="<|eot_id|>"),
    ConversationTemplate("voco_official", "voco_official", _VOCO_SYSTEM, sep=" ", sep2="</s>", voco_separator="\n"),
]
# LLaVA's other names for the same templates.
_ALIASES = {"vicuna_v1": "v1", "v0_plain": "plain", "mistral_direct": "chatml_direct"}

TEMPLATES: dict[str, ConversationTemplate] = {template.name: template for template in _DEFINITIONS}
TEMPLATES.update({alias: TEMPLATES[target] for alias, target in _ALIASES.items()})


def _turn_markers() -> re.Pattern:
    """Every template's strings that open or close a turn (role tags, the end of a system block, end-of-turn
    separators), longest first."""
    markers = {marker for template in _DEFINITIONS for marker in template.turn_markers()} | {"<</SYS>>"}
    return re.compile("|".join(re.escape(marker) for marker in sorted(markers, key=len, reverse=True)))


_TURN_MARKERS = _turn_markers()


def turn_around(text: str, start: int, end: int) -> str:
    """The text of the turn that holds ``text[start:end]`` (a placeholder) in a prompt rendered by one of these
    templates: from the last turn marker before it to the first one after it (the whole text when there is
    none), stripped. What LLaMA-VID's text decoder reads of a prompt given without its turns (docs/design.md
    §3, "Instruction"): the human turn that shows the image, as the training data gives it."""
    before = [match.end() for match in _TURN_MARKERS.finditer(text, 0, start)]
    after = _TURN_MARKERS.search(text, end)
    return text[before[-1] if before else 0 : after.start() if after else len(text)]


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
