"""The inference engine: load a model once, render chats with its template, compress once, answer many.

    engine = InferenceEngine.load("checkpoints/voco-7b", store="~/.cache/voco")      # fingerprint computed once
    prompt = engine.render([{"role": "user", "content": [{"type": "image", "image": "digits.png"},
                                                         {"type": "text", "text": "What is the sum?"}]}])
    [answer] = engine.answer([prompt], GenerationOptions(max_new_tokens=64))         # compress (or load), answer
    for piece in engine.stream(prompt, GenerationOptions(temperature=0.7, seed=0)):  # the same, token by token
        print(piece, end="")

The chat CLI (``serve/cli.py`` through ``inference.ImageChat``), the eval entry (``eval/model_vqa.py``) and the
server stand on it. It holds no conversation: each call gets the whole conversation, renders it with the
checkpoint's template (the ``--version`` it was trained with, ``conversation_template_of``), compresses the
media of the prompt's head (the text up to its last image or video placeholder) into a :class:`VoCoCache`
(from a :class:`VoCoCacheStore` when given, and from a small in-memory LRU of recent heads), and sends the
model only the tokens after it. Prompts about different images are answered in one batch
(``VoCoCache.concatenate``). A model without VoCo (``voco_tokens=0``) reads the whole prompt with its images.

Threads: model calls take the engine's lock, so one engine may serve several threads, one forward at a time.
"""

from __future__ import annotations

import importlib.util
import queue
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from .conversation import GPT, HUMAN, ConversationError, ConversationTemplate, get_template
from .errors import InputError
from .model.attention import attention_backend_names
from .model.voco_cache import VoCoCache, model_fingerprint

DEFAULT_TEMPLATE = "v1"  # a checkpoint that records no template (saved before templates were saved, or not by the train entry)
_PLACEHOLDERS = re.compile(f"{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)}")
_ROLES = {"user": HUMAN, "assistant": GPT}


# -- what a call takes and gives --------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationOptions:
    """How to decode. ``temperature`` 0 is greedy; ``seed`` makes sampling repeatable (the global RNG is
    left as it was); ``stop``: strings that end the answer (not included in it)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float | None = None
    num_beams: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    generate_extra: dict = field(default_factory=dict)  # more of ``generate``'s keywords (suppress_tokens, ...)

    def generate_kwargs(self, tokenizer) -> dict:
        kwargs = {**self.generate_extra, "max_new_tokens": self.max_new_tokens, "do_sample": self.temperature > 0,
                  "num_beams": self.num_beams}
        if self.temperature > 0:
            kwargs["temperature"] = self.temperature
            if self.top_p is not None:
                kwargs["top_p"] = self.top_p
        if self.stop:
            kwargs["stop_strings"], kwargs["tokenizer"] = list(self.stop), tokenizer
        return kwargs


@dataclass
class Prompt:
    """A conversation rendered for the model (``InferenceEngine.render``).

    text          the whole prompt, ending where the reply starts
    images        the images in placeholder order (paths, encoded bytes or PIL images)
    videos        the videos after them (frames, or precomputed frame features ``[frames, patches, dim]``)
    head          the text up to the last media placeholder: what one compression covers ("" without media)
    instructions  LLaMA-VID's text per placeholder (the turn that shows it, less placeholders); else None
    """

    text: str
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)
    head: str = ""
    instructions: list[str] | None = None

    @property
    def has_media(self) -> bool:
        return bool(self.images or self.videos)


@dataclass
class Answer:
    """One reply. ``prompt_tokens``: the positions the model read for the prompt (the compressed cache plus
    the tokens sent); ``uncompressed_prompt_tokens``: the same prompt with all its vision tokens, as a model
    without compression reads it. ``finish_reason``: ``"stop"`` (end of sequence or a stop string) or
    ``"length"`` (``max_new_tokens`` reached). ``cache_hit``: the head came from the store or memory."""

    text: str
    finish_reason: str
    prompt_tokens: int
    uncompressed_prompt_tokens: int
    completion_tokens: int
    cache_hit: bool = False


# -- loading -----------------------------------------------------------------------------------------------
def check_model_path(model_path: str) -> None:
    """A local model folder must exist and hold a ``config.json``. A path that is not a folder here is a
    mistyped folder, unless it reads as a Hub id (``org/name`` whose ``org`` is no folder here): that one is
    left to ``from_pretrained``."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise InputError(f"{model_path}: not a model folder (no config.json)")
        return
    if path.exists():
        raise InputError(f"{model_path}: not a model folder")
    parts = model_path.split("/")
    looks_like_hub_id = (len(parts) == 2 and all(parts) and not model_path.startswith((".", "~"))
                         and not Path(parts[0]).expanduser().exists())
    if not looks_like_hub_id:
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


def quantization_config(load_4bit: bool, load_8bit: bool):
    """LLaVA's ``--load-4bit`` (NF4, double quantization, fp16 compute) / ``--load-8bit`` through bitsandbytes;
    one line when it is not installed."""
    if not (load_4bit or load_8bit):
        return None
    flag = "--load-4bit" if load_4bit else "--load-8bit"
    if load_4bit and load_8bit:
        raise InputError("--load-4bit and --load-8bit: give one of them")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InputError(f"{flag} needs bitsandbytes, which is not installed (pip install bitsandbytes; "
                         "it quantizes on a CUDA GPU)")
    from transformers import BitsAndBytesConfig

    if load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16,
                              bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4")


def load_model(model_path: str, device: str | None = None, dtype: str | None = None,
               attn_implementation: str | None = None, voco_tokens: int | None = None,
               load_4bit: bool = False, load_8bit: bool = False):
    """Any checkpoint this package saves (VoCo or plain Llava), with its processor. ``attn_implementation``:
    as transformers', plus ``varlen_reference`` / ``varlen_torch``; ``flash_attention_2`` without flash-attn
    is refused before any weight is read. ``voco_tokens``: an elastic model's k (docs/design.md §2.7), which
    the processor then lays out after each image (refused before loading when the model was not trained
    for it). ``load_4bit`` / ``load_8bit``: bitsandbytes quantization, as LLaVA's flags."""
    import llava_voco  # noqa: F401  (registers the Auto classes and the varlen backends)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .model.llamavid_original import LlamaVidCheckpointError, is_llamavid_original, load_llamavid_original
    from .model.llava_original import LlavaCheckpointError, is_llava_original, load_llava_original
    from .model.attention import AttentionBackendUnavailable, implementations_for

    check_model_path(model_path)
    if voco_tokens is not None:
        check_voco_tokens(model_path, voco_tokens)
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    quantization = quantization_config(load_4bit, load_8bit)
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map=device or "auto")
        kwargs.setdefault("dtype", torch.float16)
    if attn_implementation:
        try:  # the backend table's: checked before any weight is read, the vision tower on its vision backend
            kwargs["attn_implementation"] = implementations_for(attn_implementation)
        except AttentionBackendUnavailable as error:
            raise InputError(str(error)) from None
    try:
        if is_llava_original(model_path):  # LLaVA's own format: converted on the fly (scripts/convert_llava_checkpoint.py)
            if quantization is not None:
                raise InputError(f"{model_path}: a LLaVA-format checkpoint is converted in memory, unquantized: "
                                 "convert it with scripts/convert_llava_checkpoint.py to load it quantized")
            model, processor = load_llava_original(model_path, dtype=kwargs.get("dtype"),
                                                   attn_implementation=attn_implementation)
        elif is_llamavid_original(model_path):  # LLaMA-VID's own (scripts/convert_llamavid_checkpoint.py)
            if quantization is not None:
                raise InputError(f"{model_path}: a LLaMA-VID checkpoint is converted in memory, unquantized: "
                                 "convert it with scripts/convert_llamavid_checkpoint.py to load it quantized")
            model, processor = load_llamavid_original(model_path, dtype=kwargs.get("dtype"),
                                                      attn_implementation=attn_implementation)
        else:
            model = AutoModelForImageTextToText.from_pretrained(model_path, **kwargs).eval()
            processor = AutoProcessor.from_pretrained(model_path)
    except (LlavaCheckpointError, LlamaVidCheckpointError) as error:
        raise InputError(str(error)) from None
    except OSError as error:  # a Hub id that cannot be fetched, a folder with missing files
        first_line = str(error).strip().splitlines()[0]
        if not Path(model_path).expanduser().exists():
            raise InputError(f"{model_path}: no such model folder, and no model of that name on the Hugging Face "
                             f"Hub ({first_line})") from None
        raise InputError(f"{model_path}: cannot load the model: {first_line}") from None
    if device and quantization is None:
        model.to(device)
    if voco_tokens is not None:
        processor.voco_tokens = voco_tokens  # every prompt's images get k VoCo tokens; compress reads k from them
    return model, processor


def add_model_arguments(parser) -> None:
    """The flags of every entry that loads a model for inference (chat CLI, eval entry), as LLaVA names them;
    ``load_model_from_args`` reads them."""
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--conv-mode", default=None,
                        help="conversation template (LLaVA's --version names; default: the one the checkpoint was "
                             f"trained with, {DEFAULT_TEMPLATE} where it records none)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--attn-implementation", default=None,
                        help=f"the language model's attention backend: {', '.join(attention_backend_names())} "
                             "(llava_voco.model.attention's table; default: the checkpoint's)")
    parser.add_argument("--voco-tokens", type=int, default=None,
                        help="an elastic model's VoCo count per image, one of those it was trained with "
                             "(default: its largest)")
    parser.add_argument("--load-4bit", action="store_true", help="quantize the weights with bitsandbytes (NF4)")
    parser.add_argument("--load-8bit", action="store_true", help="quantize the weights with bitsandbytes (int8)")


def model_kwargs_from_args(args) -> dict:
    """``load_model``'s keywords from ``add_model_arguments``' flags."""
    return {"device": args.device, "attn_implementation": args.attn_implementation, "voco_tokens": args.voco_tokens,
            "load_4bit": args.load_4bit, "load_8bit": args.load_8bit}


def conversation_template_of(processor, conv_mode: str | None = None) -> ConversationTemplate:
    """The template to prompt with: ``conv_mode`` when given, else the ``--version`` the checkpoint was trained
    with (the train entry records it as ``processor.conversation_version``), else ``DEFAULT_TEMPLATE``."""
    return get_template(conv_mode or getattr(processor, "conversation_version", None) or DEFAULT_TEMPLATE)


def stock_llava_inputs(model, inputs):
    """Without VoCo a checkpoint loads as stock ``LlavaForConditionalGeneration``, which reads a video's
    frames as plain images and has no ``video_frame_mask`` input (only LLaMA-VID needs it)."""
    from .model.modeling_voco_llava import VoCoLlavaForConditionalGeneration

    if not isinstance(model, VoCoLlavaForConditionalGeneration) and "video_frame_mask" in inputs:
        inputs = {k: v for k, v in inputs.items() if k != "video_frame_mask"}
    return inputs


def media_instruction(turn_text: str) -> str:
    """LLaMA-VID's instruction for the media of a human turn: the turn without its placeholders, as the
    training data gives it (so the context token reads the question at inference as it did in training)."""
    return _PLACEHOLDERS.sub("", turn_text).strip()


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


# -- the engine --------------------------------------------------------------------------------------------
class InferenceEngine:
    """A loaded model and processor, the template to prompt with, and where compressed heads are kept.

    ``template``: a ``ConversationTemplate`` or its ``--version`` name (default: the checkpoint's own,
    ``conversation_template_of``). ``store``: a ``VoCoCacheStore`` or its folder, shared across processes and
    runs. ``memory_cache_size``: heads kept in memory (least recently used out), so that a conversation's
    turns and a batch's questions about one image compress it once without a store.
    """

    def __init__(self, model, processor, template: ConversationTemplate | str | None = None, store=None,
                 memory_cache_size: int = 16):
        from .serve.cache_store import VoCoCacheStore

        self.model, self.processor = model, processor
        self.template = template if isinstance(template, ConversationTemplate) else conversation_template_of(
            processor, template)
        self.template.lay_out_voco(processor)  # voco_official: the released "<image>\\n<voco><voco>" layout
        self.store = VoCoCacheStore(store) if isinstance(store, (str, Path)) else store
        self.uses_voco = getattr(model.config, "voco_tokens", 0) > 0
        self.reads_instruction = getattr(processor, "reads_instruction", False)  # the projector method's
        self.fingerprint = model_fingerprint(model) if self.uses_voco else ""  # once: model_fingerprint keeps it
        self.memory_cache_size = memory_cache_size
        self._memory: OrderedDict[str, VoCoCache] = OrderedDict()
        self._lock = threading.RLock()

    @classmethod
    def load(cls, model_path: str, *, conv_mode: str | None = None, store=None, device: str | None = None,
             dtype: str | None = None, attn_implementation: str | None = None, voco_tokens: int | None = None,
             load_4bit: bool = False, load_8bit: bool = False, memory_cache_size: int = 16) -> "InferenceEngine":
        """``load_model`` (one-line ``InputError`` for a missing folder, a refused backend, an elastic k the
        model was not trained for, bitsandbytes missing) and the engine over it."""
        if conv_mode is not None:
            get_template(conv_mode)  # an unknown name is refused before the weights load
        model, processor = load_model(model_path, device=device, dtype=dtype, attn_implementation=attn_implementation,
                                      voco_tokens=voco_tokens, load_4bit=load_4bit, load_8bit=load_8bit)
        return cls(model, processor, conv_mode, store=store, memory_cache_size=memory_cache_size)

    # -- rendering ---------------------------------------------------------------------------------------
    def render(self, messages: list[dict]) -> Prompt:
        """The prompt asking for the next reply to ``messages`` (transformers' / OpenAI's chat format: roles
        ``system`` / ``user`` / ``assistant``, content a string or a list of parts ``{"type": "text", "text"}``,
        ``{"type": "image", "image": path | bytes | PIL}``, ``{"type": "video", "video": frames | features}``),
        rendered with this engine's template exactly as training rendered it (and as the checkpoint's saved
        chat template renders it). Media parts become ``<image>\\n`` / ``<video>\\n`` where they stand; all
        images come before any video (the processor's order). Raises ``ConversationError`` for roles out of
        order, an unknown part, or an image after a video."""
        template, turns, images, videos, media_turns = self.template, [], [], [], []
        for number, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role == "system":
                if number != 0:
                    raise ConversationError("a system message must come first")
                template = template.with_system(content if isinstance(content, str) else _text_of(content))
                continue
            if role not in _ROLES:
                raise ConversationError(f"message {number}: unknown role {role!r} (system, user or assistant)")
            text = content if isinstance(content, str) else ""
            for part in ([] if isinstance(content, str) else content or []):
                kind = part.get("type")
                if kind == "text":
                    text += part["text"]
                elif kind == "image" and role == "user":
                    if videos:
                        raise ConversationError("an image after a video: give the images first")
                    images.append(part["image"])
                    text += IMAGE_PLACEHOLDER + "\n"
                elif kind == "video" and role == "user":
                    videos.append(part["video"])
                    text += VIDEO_PLACEHOLDER + "\n"
                else:
                    raise ConversationError(f"message {number}: a {role} message cannot hold a {kind!r} part")
            if _PLACEHOLDERS.search(text):
                media_turns.append((len(turns), len(_PLACEHOLDERS.findall(text))))
            turns.append((_ROLES[role], text))
        rendered = template.render(turns, num_images=len(images), add_generation_prompt=True).text
        prompt = Prompt(rendered, images, videos)
        if prompt.has_media:
            last = max(rendered.rfind(IMAGE_PLACEHOLDER) + len(IMAGE_PLACEHOLDER),
                       rendered.rfind(VIDEO_PLACEHOLDER) + len(VIDEO_PLACEHOLDER))
            prompt.head = rendered[:last]
            if self.reads_instruction:  # each placeholder reads the turn that shows it, as in training
                prompt.instructions = [media_instruction(turns[index][1]) for index, count in media_turns
                                       for _ in range(count)]
        return prompt

    # -- compressing -------------------------------------------------------------------------------------
    def cache_key(self, prompt: Prompt) -> str:
        from .serve.cache_store import VoCoCacheStore

        elastic_k = self.processor.voco_tokens if getattr(self.processor, "voco_token_choices", None) else None
        return VoCoCacheStore.key(prompt.images, prompt.head, self.fingerprint, prompt.instructions,
                                  voco_tokens=elastic_k, videos=prompt.videos or None)

    def compress(self, prompt: Prompt) -> tuple[VoCoCache, bool]:
        """(cache of the prompt's head, hit): from memory, else the store, else compressed now (and kept in
        both). Images and videos alike; the caller must not extend the cache (``generate`` copies it)."""
        from .serve.cache_store import compress_prompt

        if not (self.uses_voco and prompt.has_media):
            raise ValueError("compress() needs a VoCo model and a prompt with an image or video")
        key = self.cache_key(prompt)
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key], True
            if self.store is not None:
                cache, hit = self.store.get_or_compress(self.model, self.processor, prompt.images, prompt.head,
                                                        prompt.instructions, videos=prompt.videos or None)
            else:
                cache, hit = compress_prompt(self.model, self.processor, prompt.images, prompt.head,
                                             prompt.instructions, prompt.videos or None), False
            self._memory[key] = cache
            while len(self._memory) > self.memory_cache_size:
                self._memory.popitem(last=False)
            return cache, hit

    # -- answering ---------------------------------------------------------------------------------------
    def answer(self, prompts: list[Prompt], options: GenerationOptions = GenerationOptions()) -> list[Answer]:
        """One answer per prompt, in one batch: prompts with media from their compressed heads (different
        images batched as cache rows), the others (or all, without VoCo) from the whole prompt."""
        answers: list[Answer | None] = [None] * len(prompts)
        cached = [i for i, p in enumerate(prompts) if self.uses_voco and p.has_media]
        whole = [i for i in range(len(prompts)) if i not in cached]
        for group, run in ((cached, self._from_caches), (whole, self._from_whole_prompts)):
            if group:
                for index, answer in zip(group, run([prompts[i] for i in group], options, streamer=None)):
                    answers[index] = answer
        return answers

    def stream(self, prompt: Prompt, options: GenerationOptions = GenerationOptions()) -> "AnswerStream":
        """The answer to one prompt as it is generated: iterate for text pieces (a stop string is never
        shown); ``.answer`` holds the whole :class:`Answer` once iteration ends. Generation runs in a thread."""
        from transformers import TextIteratorStreamer

        if options.num_beams > 1:
            raise ValueError("streaming decodes one sequence: num_beams must be 1")
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=None)
        run = self._from_caches if self.uses_voco and prompt.has_media else self._from_whole_prompts
        return AnswerStream(lambda: run([prompt], options, streamer=streamer)[0], streamer, options.stop)

    def _generate(self, options: GenerationOptions, streamer, **inputs) -> torch.Tensor:
        kwargs = options.generate_kwargs(self.processor.tokenizer)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with self._lock, torch.random.fork_rng(devices=devices, enabled=options.seed is not None):
            if options.seed is not None:
                torch.manual_seed(options.seed)
            return self.model.generate(**inputs, streamer=streamer, **kwargs)

    def _from_caches(self, prompts: list[Prompt], options: GenerationOptions, streamer) -> list[Answer]:
        tokenizer = self.processor.tokenizer
        looked_up = [self.compress(prompt) for prompt in prompts]  # one-row caches; one object per distinct head
        distinct = list({id(cache): cache for cache, _ in looked_up}.values())
        if len(distinct) == 1:
            cache = distinct[0]  # generate gives each question a copy of its row
        else:
            cache = VoCoCache.concatenate(distinct, pad_token_id=self.model._pad_token_id())
            rows = [next(i for i, d in enumerate(distinct) if d is c) for c, _ in looked_up]
            if rows != list(range(len(prompts))):
                cache = cache.repeat_rows(torch.tensor(rows))
        sent = [ids_after_media(tokenizer, prompt.text, self.processor.image_token_id) for prompt in prompts]
        input_ids, attention_mask = self._left_padded(sent)
        output = self._generate(options, streamer, input_ids=input_ids, attention_mask=attention_mask,
                                past_key_values=cache)
        answers = self._answers(output[:, input_ids.shape[1]:], options)
        for answer, (head, hit), ids in zip(answers, looked_up, sent):
            answer.prompt_tokens = int(head.attention_mask[0].sum()) + len(ids)
            answer.uncompressed_prompt_tokens = answer.prompt_tokens + int(head.vision_tokens_dropped[0])
            answer.cache_hit = hit
        return answers

    def _from_whole_prompts(self, prompts: list[Prompt], options: GenerationOptions, streamer) -> list[Answer]:
        from .serve.cache_store import as_rgb

        tokenizer = self.processor.tokenizer
        media = {"images": [as_rgb(image) for p in prompts for image in p.images] or None}
        if any(p.videos for p in prompts):
            media["videos"] = [video for p in prompts for video in p.videos]
        if self.reads_instruction and any(p.has_media for p in prompts):
            media["instructions"] = [text for p in prompts for text in (p.instructions or [])]
        with self._lock:  # the tokenizer's padding side is shared state
            previous_side, tokenizer.padding_side = tokenizer.padding_side, "left"
            try:
                inputs = self.processor(text=[p.text for p in prompts], return_tensors="pt", padding=True, **media)
            finally:
                tokenizer.padding_side = previous_side
        inputs = inputs.to(self.model.device)
        output = self._generate(options, streamer, **stock_llava_inputs(self.model, inputs))
        answers = self._answers(output[:, inputs["input_ids"].shape[1]:], options)
        for row, answer in enumerate(answers):
            answer.prompt_tokens = answer.uncompressed_prompt_tokens = int(inputs["attention_mask"][row].sum())
        return answers

    def _left_padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows`` left padded into ``(input_ids, attention_mask)``; padding is masked, so any id does where
        the tokenizer has no pad token (its end of sequence then, as ``generate`` pads)."""
        tokenizer = self.processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        pad = pad if pad is not None else 0
        width = max(len(row) for row in rows)
        ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=self.model.device)
        return ids, mask

    def _answers(self, generated: torch.Tensor, options: GenerationOptions) -> list[Answer]:
        """Decoded rows of ``generated`` ``[batch, new]``: cut at the end of sequence and at a stop string."""
        tokenizer = self.processor.tokenizer
        eos = self.model.generation_config.eos_token_id
        eos_ids = set([] if eos is None else eos if isinstance(eos, (list, tuple)) else [eos])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        answers = []
        for row in generated.tolist():
            ended = next((i for i, token in enumerate(row) if token in eos_ids), None)
            tokens = row if ended is None else row[: ended + 1]
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            stop_at = _first_stop(text, options.stop)
            finish = "stop" if ended is not None or stop_at is not None else "length"
            answers.append(Answer((text if stop_at is None else text[:stop_at]).strip(), finish, 0, 0, len(tokens)))
        return answers

    # -- what a cache saves ------------------------------------------------------------------------------
    @staticmethod
    def cache_summary(cache: VoCoCache) -> str:
        """Cached positions and what the media would have cost without compression."""
        vision = int(cache.vision_tokens_dropped.sum())
        voco = cache.voco_tokens * int(cache.num_images.sum())  # an elastic model's k: the cache's
        cached = cache.get_seq_length()
        return (
            f"cached positions: {cached} (without compression: {cached + vision}); "
            f"{vision} vision tokens -> {voco} VoCo token(s), compression ratio {vision / voco:.0f}x"
        )


def _text_of(parts: list[dict]) -> str:
    return "".join(part.get("text", "") for part in parts)


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [text.find(stop) for stop in stops if stop and stop in text]
    return min(found) if found else None


class AnswerStream:
    """Text pieces of one answer as they are generated (``InferenceEngine.stream``); ``answer`` is set once
    iteration ends. Text that may begin a stop string is held back until it cannot."""

    def __init__(self, run, streamer, stops: tuple[str, ...]):
        self.answer: Answer | None = None
        self._streamer, self._stops = streamer, stops
        self._errors: queue.Queue = queue.Queue()

        def work():
            try:
                self.answer = run()
            except BaseException as error:  # handed to the reader, after the streamer is closed
                self._errors.put(error)
                streamer.end()

        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[str]:
        shown, text = 0, ""
        for piece in self._streamer:
            text += piece
            stop_at = _first_stop(text, self._stops)
            if stop_at is not None:
                if stop_at > shown:
                    yield text[shown:stop_at]
                shown = len(text) + 1
                continue
            if shown > len(text):
                continue
            safe = len(text) - max((k for stop in self._stops for k in range(len(stop), 0, -1)
                                    if text.endswith(stop[:k])), default=0)
            if safe > shown:
                yield text[shown:safe]
                shown = safe
        self._thread.join()
        if not self._errors.empty():
            raise self._errors.get()
        if shown < len(text) and _first_stop(text, self._stops) is None:
            yield text[shown:]


__all__ = [
    "Answer",
    "AnswerStream",
    "DEFAULT_TEMPLATE",
    "GenerationOptions",
    "InferenceEngine",
    "Prompt",
    "add_model_arguments",
    "check_model_path",
    "check_voco_tokens",
    "conversation_template_of",
    "ids_after_media",
    "load_model",
    "media_instruction",
    "model_kwargs_from_args",
    "quantization_config",
    "stock_llava_inputs",
]
