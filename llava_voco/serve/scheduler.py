"""The server's model worker: each image compressed once for every request, questions decoded together.

One thread owns the model. Requests (already rendered, their media decoded and checked) wait in a queue;
the worker admits them into a running batch whenever a slot is free (step-level continuous batching):

1. the request's media cache from the inference engine (``InferenceEngine.compress``: its in-memory set,
   else the ``VoCoCacheStore``, else compressed and stored); one compression per key, however many
   requests ask at once (the worker is the only caller, and the store is single-flight);
2. its question tokens (what follows the last image in the prompt) are prefilled on a copy of that cache;
3. the row joins the batch (``VoCoCache.concatenate``, left padded) and every step decodes one token for
   all rows; a finished, cancelled or disconnected request leaves the batch at the next step, freeing its
   slot for a waiting one.

The batch is always a fully described ``VoCoCache`` (each step's token is appended to ``token_ids``), so
the model's own continuation path computes masks and position ids: text resumes at its original
position after the dropped vision tokens. Three modes serve the same base model for comparison
(``benchmarks/serving.py``): ``voco`` (compressed caches), ``full-cache`` (a prefix cache holding every
vision token, what a prefix-caching engine keeps) and ``full`` (every request prefills its image).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..engine import GenerationOptions, InferenceEngine, Prompt, stock_llava_inputs
from ..model.voco_cache import VoCoCache
from .cache_store import VoCoCacheStore, as_rgb

logger = logging.getLogger(__name__)

MODES = ("voco", "full-cache", "full")


@dataclass
class PreparedRequest:
    """A request checked and rendered on the HTTP side, ready for the model."""

    prompt: Prompt  # the engine's rendering: text up to the reply, media, head (text up to the last placeholder)
    question_ids: list[int]  # the prompt's tokens after its last media placeholder (all of them without media)
    options: GenerationOptions
    uncompressed_prompt_tokens: int  # positions the prompt takes with every vision token
    received_at: float = field(default_factory=time.perf_counter)


class Generation:
    """One request in flight; the worker pushes events to its asyncio queue: ("delta", text),
    ("done", finish_reason), ("error", message)."""

    def __init__(self, request: PreparedRequest, emit: Callable[[tuple], None]):
        self.request = request
        self.emit = emit
        self.cancelled = False
        self.tokens: list[int] = []  # sampled tokens, the final end of sequence included
        self.sent_text = ""
        self.text = ""
        self.finish_reason: str | None = None
        self.prompt_tokens = 0  # positions the model holds for the prompt (compressed)
        self.uncompressed_prompt_tokens = request.uncompressed_prompt_tokens
        self.cache_info: dict = {}
        self.next_token: int | None = None
        self.generator: torch.Generator | None = None

    def cancel(self) -> None:
        """The client went away: the worker drops the request at its next step."""
        self.cancelled = True


class ServingEngine:
    """The inference engine's model (fingerprint computed once), the hot caches and the decoding loop."""

    def __init__(self, engine: InferenceEngine, mode: str | None = None, max_batch: int = 16,
                 hot_entries: int = 256, metrics=None):
        self.engine = engine
        self.model, self.processor, self.tokenizer = engine.model, engine.processor, engine.processor.tokenizer
        self.uses_voco = engine.uses_voco
        self.mode = mode or ("voco" if self.uses_voco else "full-cache")
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: one of {', '.join(MODES)}")
        if self.mode == "voco" and not self.uses_voco:
            raise ValueError("mode voco needs a VoCo checkpoint (voco_tokens > 0)")
        if self.uses_voco and self.mode != "voco":
            raise ValueError(f"mode {self.mode} serves a checkpoint without VoCo (its base LLaVA)")
        if engine.reads_instruction:
            raise ValueError("serving LLaMA-VID checkpoints (whose compression reads the question) is not supported yet")
        self.max_batch = max_batch
        self.metrics = metrics
        self.max_positions = self.model.config.text_config.max_position_embeddings
        self.pad_token_id = self._pad_token_id()
        generation_config = self.model.generation_config
        eos = generation_config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        suppressed = set(generation_config.suppress_tokens or [])
        if self.uses_voco:  # as model.generate: an answer never holds an image or VoCo placeholder
            suppressed |= {self.model.config.image_token_id, self.model.config.voco_token_id}
        self.suppressed = sorted(suppressed)
        # heads answered recently, by key, in front of the engine's store
        self._hot: OrderedDict[str, VoCoCache] = OrderedDict()
        self.hot_entries = hot_entries
        self._pending: queue.Queue[Generation | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="voco-model", daemon=True)
        self._stopping = False

    def _pad_token_id(self) -> int:
        for pad in (self.tokenizer.pad_token_id, self.model.generation_config.pad_token_id,
                    self.tokenizer.eos_token_id):
            if pad is not None:
                return int(pad)
        return 0

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._pending.put(None)
        self._thread.join(timeout=10)

    def submit(self, request: PreparedRequest, emit: Callable[[tuple], None]) -> Generation:
        generation = Generation(request, emit)
        options = request.options
        if options.temperature > 0:  # each sampled request draws from its own generator: batch-independent
            generation.generator = torch.Generator(device=self.model.device)
            generation.generator.manual_seed(options.seed if options.seed is not None
                                             else int(torch.randint(0, 2**62, (1,))))
        self._pending.put(generation)
        return generation

    # -- caches --------------------------------------------------------------------------------
    def media_cache(self, prompt: Prompt) -> tuple[VoCoCache, str]:
        """(cache of the prompt's head, where it came from: "memory", "store" or "compressed"). Only the
        worker thread calls it, so concurrent requests for one new image cost one compression."""
        if self.mode == "voco":
            key = self.engine.cache_key(prompt)
        else:  # a full-token prefix cache: every vision token kept
            key = VoCoCacheStore.key(prompt.images, "[full-cache]" + prompt.head, self.engine.fingerprint,
                                     videos=prompt.videos or None)
        cache = self._hot.get(key)
        if cache is not None:
            self._hot.move_to_end(key)
            return cache, "memory"
        if self.mode == "voco":
            cache, hit = self.engine.compress(prompt)  # the engine's store, else compressed and stored
            where = "store" if hit else "compressed"
        else:
            cache, where = self._prefill_fresh(self._processor_inputs(prompt.head, prompt))[0], "compressed"
        self._hot[key] = cache
        while len(self._hot) > self.hot_entries:
            self._hot.popitem(last=False)
        if self.metrics is not None:
            self.metrics.cache_bytes.set(self.hot_cache_bytes())
        return cache, where

    def _processor_inputs(self, text: str, prompt: Prompt):
        media = {}
        if prompt.images:
            media["images"] = [as_rgb(image) for image in prompt.images]
        if prompt.videos:
            media["videos"] = list(prompt.videos)
        inputs = self.processor(text=text, return_tensors="pt", **media).to(self.model.device)
        return stock_llava_inputs(self.model, inputs)

    @torch.no_grad()
    def _prefill_fresh(self, inputs) -> tuple[VoCoCache, torch.Tensor]:
        """(a fresh one-row cache holding a whole prompt with every vision token, its last logits [1, vocab])."""
        input_ids = inputs["input_ids"]  # [1, n]
        cache = VoCoCache(config=self.model.config.text_config, fingerprint=self.engine.fingerprint)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        model_inputs = {name: value for name, value in inputs.items() if name not in ("input_ids", "attention_mask")}
        output = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), position_ids=positions,
                            past_key_values=cache, use_cache=True, logits_to_keep=1, **model_inputs)
        cache.token_ids = input_ids
        cache.attention_mask = torch.ones_like(input_ids)
        cache.next_position = torch.tensor([input_ids.shape[1]], device=input_ids.device)
        cache.num_images = torch.zeros(1, dtype=torch.long)  # nothing compressed: every vision token is held
        cache.vision_tokens_dropped = torch.zeros(1, dtype=torch.long)
        return cache, output.logits[:, -1].float()

    def hot_cache_bytes(self) -> int:
        """Bytes of keys/values held by the hot caches (what the sessions of their images share)."""
        return sum(_cache_bytes(cache) for cache in self._hot.values())

    # -- one row -------------------------------------------------------------------------------
    @torch.no_grad()
    def _start(self, generation: Generation) -> VoCoCache:
        """The request's one-row cache with its whole prompt, and its first token chosen."""
        request = generation.request
        if request.prompt.has_media and self.mode != "full":
            head, where = self.media_cache(request.prompt)
            self._count_cache(where)
            row = head.clone()
            input_ids = torch.tensor([request.question_ids], device=self.model.device)
            logits = self._forward(row, input_ids)
            vision = int(head.vision_tokens_dropped.sum())
            generation.cache_info = {
                "source": where,
                "cached_positions": head.described_length,
                "vision_tokens": vision if self.mode == "voco" else 0,
                "voco_tokens": head.voco_tokens * int(head.num_images.sum()) if self.mode == "voco" else 0,
            }
        else:
            row, logits = self._prefill_fresh(self._processor_inputs(request.prompt.text, request.prompt))
            generation.cache_info = {"source": "prefill", "cached_positions": 0, "vision_tokens": 0, "voco_tokens": 0}
        generation.prompt_tokens = row.described_length
        generation.uncompressed_prompt_tokens = int(row.next_position[0])  # positions count every vision token
        if self.metrics is not None:
            self.metrics.prompt_tokens(generation.prompt_tokens, generation.uncompressed_prompt_tokens)
        self._choose(generation, logits[0])
        return row

    def _forward(self, cache: VoCoCache, input_ids: torch.Tensor) -> torch.Tensor:
        """Continue ``cache`` (fully described) with ``input_ids`` [batch, n]; the cache then describes them
        too. Returns the last position's logits [batch, vocab]."""
        batch, length = input_ids.shape
        attention_mask, position_ids = cache.continuation_inputs(batch, length, None, None)
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.token_ids = torch.cat([cache.token_ids, input_ids], dim=1)
        cache.attention_mask = torch.cat([cache.attention_mask, torch.ones_like(input_ids)], dim=1)
        cache.next_position = cache.next_position + length
        return output.logits[:, -1].float()

    def _choose(self, generation: Generation, logits: torch.Tensor) -> None:
        """Pick the next token of one row ([vocab] logits), stream its text, and decide if the row is done."""
        options = generation.request.options
        if self.suppressed:
            logits = logits.clone()
            logits[self.suppressed] = float("-inf")
        if options.temperature <= 0:
            token = int(logits.argmax())
        else:
            probabilities = torch.softmax(logits / options.temperature, dim=-1)
            if options.top_p is not None and options.top_p < 1.0:
                ordered, order = probabilities.sort(descending=True)
                outside = ordered.cumsum(-1) - ordered > options.top_p  # keep the smallest set reaching top_p
                ordered = ordered.masked_fill(outside, 0.0)
                probabilities = torch.zeros_like(probabilities).scatter(0, order, ordered)
            token = int(torch.multinomial(probabilities, 1, generator=generation.generator))
        generation.tokens.append(token)
        if generation.request.received_at and len(generation.tokens) == 1 and self.metrics is not None:
            self.metrics.first_token(time.perf_counter() - generation.request.received_at)
        if token in self.eos_token_ids:
            self._finish(generation, "stop")
            return
        generation.next_token = token
        text = self.tokenizer.decode(generation.tokens, skip_special_tokens=True)
        for stop in options.stop:
            index = text.find(stop)
            if index >= 0:
                generation.text = text[:index]
                self._finish(generation, "stop")
                return
        generation.text = text
        held_back = max((len(stop) - 1 for stop in options.stop), default=0)  # a stop string may be starting
        visible = text.strip()
        visible = visible[: max(0, len(visible) - held_back)] if held_back else visible
        if not visible.endswith("\ufffd") and visible.startswith(generation.sent_text) and len(visible) > len(generation.sent_text):
            generation.emit(("delta", visible[len(generation.sent_text):]))
            generation.sent_text = visible
        if len(generation.tokens) >= options.max_new_tokens:
            self._finish(generation, "length")

    def _finish(self, generation: Generation, reason: str) -> None:
        generation.finish_reason = reason
        final = generation.text.strip()
        if final.startswith(generation.sent_text) and len(final) > len(generation.sent_text):
            generation.emit(("delta", final[len(generation.sent_text):]))
            generation.sent_text = final
        generation.text = final
        if self.metrics is not None:
            self.metrics.tokens_generated(len(generation.tokens))
        generation.emit(("done", reason))

    def _count_cache(self, where: str) -> None:
        if self.metrics is not None:
            self.metrics.cache(where)

    # -- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        rows: list[Generation] = []
        batch: VoCoCache | None = None
        while not self._stopping:
            # admit waiting requests into free slots (block only when nothing runs)
            while len(rows) < self.max_batch:
                try:
                    generation = self._pending.get(block=not rows, timeout=None)
                except queue.Empty:
                    break
                if generation is None:
                    return
                if generation.cancelled:  # gone while waiting for a slot
                    generation.finish_reason = "cancelled"
                    if self.metrics is not None:
                        self.metrics.request_cancelled(0)
                    continue
                try:
                    row = self._start(generation)
                except Exception as error:  # a bug or a broken input reaching the model: this request only
                    logger.exception("request failed")
                    generation.emit(("error", f"{type(error).__name__}: {error}"))
                    continue
                if generation.finish_reason is not None:
                    continue
                batch = row if batch is None else VoCoCache.concatenate([batch, row], pad_token_id=self.pad_token_id)
                rows.append(generation)
            if not rows:
                continue
            keep = []
            for index, generation in enumerate(rows):
                if generation.cancelled and generation.finish_reason is None:
                    generation.finish_reason = "cancelled"
                    if self.metrics is not None:
                        self.metrics.request_cancelled(len(generation.tokens))
                elif generation.finish_reason is None:
                    keep.append(index)
            if len(keep) < len(rows):
                rows = [rows[index] for index in keep]
                batch = _select_rows(batch, keep) if rows else None
                if not rows:
                    continue
            if self.metrics is not None:
                self.metrics.batch(len(rows))
            tokens = torch.tensor([[generation.next_token] for generation in rows], device=self.model.device)
            try:
                with torch.no_grad():
                    logits = self._forward(batch, tokens)
            except Exception as error:
                logger.exception("decoding step failed")
                for generation in rows:
                    generation.emit(("error", f"{type(error).__name__}: {error}"))
                rows, batch = [], None
                continue
            for index, generation in enumerate(rows):
                if not generation.cancelled:
                    self._choose(generation, logits[index])


def _select_rows(cache: VoCoCache, rows: list[int]) -> VoCoCache:
    """Keep ``rows`` of a fully described batch cache and drop the leading columns no kept row uses."""
    cache.batch_select_indices(torch.tensor(rows, device=cache.token_ids.device))
    used = cache.attention_mask.bool().any(dim=0)
    first = int(used.float().argmax()) if bool(used.any()) else 0
    if first > 0:
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        cache.token_ids, cache.attention_mask = cache.token_ids[:, first:], cache.attention_mask[:, first:]
    return cache


def _cache_bytes(cache: VoCoCache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers)


__all__ = ["MODES", "Generation", "PreparedRequest", "ServingEngine"]
