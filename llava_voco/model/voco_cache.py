"""A compressed image as a KV cache: only the positions text may read, plus where text resumes.

After one prefill over ``[prefix, V, VoCo]`` the vision keys/values are never read again (docs/design.md
§2.3), so :class:`VoCoCache` keeps ``prefix + k`` positions per image and the position id of the next token,
which keeps its original value. In ``official`` mode text may not read the prefix, but a later image's
tokens may, so the cache keeps it too and the continuation's mask hides it from text. It is a
``DynamicCache``, so transformers' ``generate`` continues from it; ``model.generate`` (``voco_generation``)
copies it first unless asked to keep the turn.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

FORMAT_VERSION = 1


class VoCoCacheError(ValueError):
    """A stored cache cannot be used with this model (other model, corrupt file, unknown format)."""


def _fingerprint_state(model) -> tuple:
    """What the fingerprint depends on, cheap to read: the config, and each parameter's storage and version
    counter (torch bumps it at every in-place change: an optimizer step, ``load_state_dict``, ``mul_``)."""
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "_attn_implementation_autoset", "torch_dtype", "dtype"):
        config.pop(volatile, None)
    parameters = tuple(
        (name, parameter.data_ptr(), parameter._version, parameter.dtype, tuple(parameter.shape))
        for name, parameter in model.named_parameters()
    )
    return json.dumps(config, sort_keys=True, default=str), parameters


def model_fingerprint(model) -> str:
    """sha256 of the config and of every byte of every weight: the key that ties a cache to its model.

    Every weight, because the row VoCo trains (``<voco>``'s embedding) is one row of 32,001: two checkpoints
    that differ there alone must not share caches. Hashing a 7B model's 14 GB takes seconds, so the digest
    is computed once per loaded model and kept on it, with the state it was computed from (the config and
    each parameter's storage and version counter): a later call that finds the same state returns it at
    once, and any change of a weight or of the config computes it again.
    """
    state = _fingerprint_state(model)
    known = getattr(model, "_voco_fingerprint", None)
    if known is not None and known[0] == state:
        return known[1]
    digest = hashlib.sha256(state[0].encode())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            digest.update(f"{name}:{tuple(parameter.shape)}:{parameter.dtype}".encode())
            if parameter.is_meta:  # offloaded: not on this machine to read
                continue
            data = parameter.detach().contiguous().reshape(-1)
            digest.update(data.view(torch.uint8).cpu().numpy())
    fingerprint = digest.hexdigest()
    model._voco_fingerprint = (state, fingerprint)
    return fingerprint


def layer_devices_of(model) -> list[torch.device]:
    """The device of each decoder layer of the language model (several under ``device_map``)."""
    layers = model.model.language_model.layers
    return [next(layer.parameters()).device for layer in layers]


class VoCoCache(DynamicCache):
    """``DynamicCache`` holding only the positions text may attend to, for a batch of prompts.

    token_ids       [batch, cached]  ids of the cached positions (pad id where ``attention_mask`` is 0)
    attention_mask  [batch, cached]  1 for real cached positions; rows of different lengths are left padded
    next_position   [batch]          position id of the first token after the cache
    Keys/values of later tokens (``generate`` appends them) come after these and are all real.
    """

    def __init__(self, config=None, *, voco_tokens: int = 0, mask_mode: str = "paper", fingerprint: str = ""):
        super().__init__(config=config)
        self.voco_tokens = voco_tokens
        self.mask_mode = mask_mode
        self.fingerprint = fingerprint
        self.token_ids = torch.zeros(0, 0, dtype=torch.long)
        self.attention_mask = torch.zeros(0, 0, dtype=torch.long)
        self.next_position = torch.zeros(0, dtype=torch.long)
        self.num_images = torch.zeros(0, dtype=torch.long)
        self.vision_tokens_dropped = torch.zeros(0, dtype=torch.long)

    # -- what the model reads ------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.token_ids.shape[0]

    @property
    def described_length(self) -> int:
        """Cached positions described by ``token_ids`` (later ones were appended by decoding)."""
        return self.token_ids.shape[1]

    def attention_mask_with(self, new_attention_mask: torch.Tensor) -> torch.Tensor:
        """2D mask over (cache, new tokens) for a forward that continues this cache."""
        appended = self.get_seq_length() - self.described_length
        batch = new_attention_mask.shape[0]
        cached = self.attention_mask.to(new_attention_mask.device).expand(batch, -1)
        decoded = new_attention_mask.new_ones(batch, appended)
        return torch.cat([cached, decoded, new_attention_mask], dim=1)

    def position_ids_for(self, attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
        """Position ids of the last ``query_length`` tokens, given the 2D mask over cache + new tokens.

        Text resumes at ``next_position`` (its original position, counting the dropped vision tokens);
        padding inside the new tokens does not advance positions, as in ``generate``.
        """
        after_cache = attention_mask[:, self.described_length :].long()
        positions = self.next_position.to(attention_mask.device)[:, None] + after_cache.cumsum(-1) - 1
        positions = positions.masked_fill(after_cache == 0, 0)
        return positions[:, -query_length:]

    def first_voco_index(self, voco_token_id: int) -> torch.Tensor:
        """``[batch]``: index among the cached positions of each row's first VoCo token (-1 if none)."""
        is_voco = (self.token_ids == voco_token_id) & self.attention_mask.bool()
        index = torch.arange(is_voco.shape[1], device=is_voco.device).expand_as(is_voco)
        first = torch.where(is_voco, index, is_voco.shape[1]).amin(dim=1) if is_voco.shape[1] else is_voco.new_zeros(
            is_voco.shape[0], dtype=torch.long)
        return torch.where(is_voco.any(dim=1), first, -1)

    def continuation_inputs(
        self, batch_size: int, query_length: int, attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(2D attention mask over cache + new tokens, position ids of the new tokens) for a forward of
        ``query_length`` new tokens; ``attention_mask`` may cover the new tokens only, or cache + new."""
        past_length = self.get_seq_length()
        if self.batch_size != batch_size:
            raise VoCoCacheError(
                f"the VoCoCache holds {self.batch_size} row(s), the input has {batch_size}; "
                "use cache.repeat_rows(...) or generate(), which does it for you"
            )
        if attention_mask is None or attention_mask.shape[1] == query_length:
            device = self.attention_mask.device if attention_mask is None else attention_mask.device
            new_mask = attention_mask if attention_mask is not None else torch.ones(
                batch_size, query_length, dtype=torch.long, device=device)
            attention_mask = self.attention_mask_with(new_mask.long())
        elif attention_mask.shape[1] != past_length + query_length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} positions; with a VoCoCache of {past_length} it "
                f"must cover the new {query_length} tokens or cache + new ({past_length + query_length})"
            )
        if position_ids is None:
            position_ids = self.position_ids_for(attention_mask, query_length)
        return attention_mask, position_ids

    # -- batch bookkeeping that generate() drives -----------------------------------------------
    def _select_rows(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.token_ids.device)
        for name in ("token_ids", "attention_mask", "next_position", "num_images", "vision_tokens_dropped"):
            setattr(self, name, getattr(self, name).index_select(0, rows))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._select_rows(torch.arange(self.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select_rows(torch.as_tensor(indices).reshape(-1))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_rows(beam_idx)

    def repeat_rows(self, rows: torch.Tensor) -> "VoCoCache":
        """A copy whose row i is row ``rows[i]`` of this cache (several questions about one image)."""
        out = self.clone()
        for layer in out.layers:
            if layer.get_seq_length() > 0:
                layer.keys = layer.keys.index_select(0, rows.to(layer.keys.device))
                layer.values = layer.values.index_select(0, rows.to(layer.values.device))
        out._select_rows(rows)
        return out

    def clone(self) -> "VoCoCache":
        """An independent cache sharing the tensors: a cache never changes a tensor in place (decoding
        concatenates into new ones), so answering from the clone leaves this cache as it was, at no copy."""
        out = copy.copy(self)
        out.layers = [copy.copy(layer) for layer in self.layers]
        return out

    def truncate(self, length: int) -> "VoCoCache":
        """A copy that keeps the first ``length`` cached positions, text resuming right after them (each row's
        ``next_position`` moves back by the real positions it drops): a conversation's cache cut back to
        where a new prompt departs from what it holds. The positions cut must be ones ``token_ids`` describes
        (a cache that decoding extended is kept whole or cut back into its described part)."""
        if not 0 <= length <= self.described_length:
            raise VoCoCacheError(f"cannot truncate a cache of {self.described_length} described positions to {length}")
        if self.get_seq_length() != self.described_length and length != self.described_length:
            raise VoCoCacheError("this cache was extended by decoding without keeping the turn; truncate the original")
        dropped = self.attention_mask[:, length:].sum(1)  # [batch] real positions cut from each row
        out = self.clone()
        for layer in out.layers:
            if layer.get_seq_length() > 0:
                layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]
        out.token_ids, out.attention_mask = self.token_ids[:, :length], self.attention_mask[:, :length]
        out.next_position = self.next_position - dropped.to(self.next_position.device)
        return out

    @classmethod
    def concatenate(cls, caches: list["VoCoCache"], pad_token_id: int = 0) -> "VoCoCache":
        """One batched cache from several (e.g. different images), left padded to the longest."""
        first = caches[0]
        for other in caches[1:]:
            if other.fingerprint != first.fingerprint or other.voco_tokens != first.voco_tokens:
                raise VoCoCacheError("cannot batch caches made by different models or with different voco_tokens")
            if other.get_seq_length() != other.described_length or first.get_seq_length() != first.described_length:
                raise VoCoCacheError("cannot batch caches that decoding extended; keep the turn first")
        length = max(c.described_length for c in caches)
        out = cls(voco_tokens=first.voco_tokens, mask_mode=first.mask_mode, fingerprint=first.fingerprint)
        out.layers = [type(layer)() for layer in first.layers]

        def left_pad(tensor: torch.Tensor, dim: int, value) -> torch.Tensor:
            missing = length - tensor.shape[dim]
            if missing == 0:
                return tensor
            shape = list(tensor.shape)
            shape[dim] = missing
            return torch.cat([tensor.new_full(shape, value), tensor], dim=dim)

        for i, layer in enumerate(out.layers):
            keys = [left_pad(c.layers[i].keys, 2, 0) for c in caches]
            values = [left_pad(c.layers[i].values, 2, 0) for c in caches]
            layer.update(torch.cat(keys), torch.cat(values))  # a fresh layer takes them as its keys/values
        out.token_ids = torch.cat([left_pad(c.token_ids, 1, pad_token_id) for c in caches])
        out.attention_mask = torch.cat([left_pad(c.attention_mask, 1, 0) for c in caches])
        for name in ("next_position", "num_images", "vision_tokens_dropped"):
            setattr(out, name, torch.cat([getattr(c, name) for c in caches]))
        return out

    # -- persistence ----------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            "token_ids": self.token_ids,
            "attention_mask": self.attention_mask,
            "next_position": self.next_position,
            "num_images": self.num_images,
            "vision_tokens_dropped": self.vision_tokens_dropped,
        }
        for i, layer in enumerate(self.layers):
            tensors[f"layers.{i}.keys"] = layer.keys
            tensors[f"layers.{i}.values"] = layer.values
        return {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}

    @staticmethod
    def _checksum(tensors: dict[str, torch.Tensor]) -> str:
        digest = hashlib.sha256()
        for name in sorted(tensors):
            digest.update(name.encode())
            digest.update(tensors[name].view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        """Safetensors file with the layers' keys/values and metadata; written atomically."""
        if self.get_seq_length() != self.described_length:
            raise VoCoCacheError("this cache was extended by decoding without keeping the turn; save the original")
        tensors = self._tensors()
        metadata = {
            "format": "llava_voco.VoCoCache",
            "format_version": str(FORMAT_VERSION),
            "fingerprint": self.fingerprint,
            "voco_tokens": str(self.voco_tokens),
            "mask_mode": self.mask_mode,
            "num_layers": str(len(self.layers)),
            "dtype": str(self.layers[0].keys.dtype) if self.layers else "",
            "checksum": self._checksum(tensors),
        }
        path = Path(path)
        # A unique temporary name in the same directory, then an atomic rename: readers (and another
        # process writing the same path) only ever see a complete file.
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        try:
            save_file(tensors, temporary, metadata=metadata)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)

    @classmethod
    def load(cls, path: str | os.PathLike, model, device: torch.device | str | None = None) -> "VoCoCache":
        """Load a cache saved by :meth:`save`, refusing one that does not belong to ``model``. Each layer's
        keys/values go to the device of that layer of ``model`` (``device``: all of them to one device)."""
        path = Path(path)
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise VoCoCacheError(f"{path}: not a readable VoCo cache (truncated or corrupt?): {error}") from error
        if metadata.get("format") != "llava_voco.VoCoCache":
            raise VoCoCacheError(f"{path}: not a VoCo cache file (format {metadata.get('format')!r})")
        if metadata.get("format_version") != str(FORMAT_VERSION):
            raise VoCoCacheError(
                f"{path}: cache format version {metadata.get('format_version')!r}, this llava_voco reads {FORMAT_VERSION}"
            )
        if cls._checksum(tensors) != metadata.get("checksum"):
            raise VoCoCacheError(f"{path}: checksum mismatch, the file is corrupt")
        expected = model_fingerprint(model)
        if metadata.get("fingerprint") != expected:
            raise VoCoCacheError(
                f"{path}: the cache was made by another model or config (fingerprint "
                f"{metadata.get('fingerprint', '')[:12]}..., this model {expected[:12]}...)"
            )
        layer_devices = layer_devices_of(model) if device is None else [torch.device(device)] * len(layer_devices_of(model))
        device = device if device is not None else model.device
        cache = cls(
            config=model.config.text_config,
            voco_tokens=int(metadata["voco_tokens"]),
            mask_mode=metadata["mask_mode"],
            fingerprint=metadata["fingerprint"],
        )
        if int(metadata["num_layers"]) != len(cache.layers):
            raise VoCoCacheError(f"{path}: {metadata['num_layers']} layers, the model has {len(cache.layers)}")
        for i, layer in enumerate(cache.layers):  # each layer's keys/values where that layer runs (device_map)
            keys = tensors[f"layers.{i}.keys"].to(layer_devices[i])
            values = tensors[f"layers.{i}.values"].to(layer_devices[i])
            layer.update(keys, values)
        for name in ("token_ids", "attention_mask", "next_position", "num_images", "vision_tokens_dropped"):
            setattr(cache, name, tensors[name].to(device))
        return cache

    def __repr__(self) -> str:
        return (
            f"VoCoCache(batch={self.batch_size}, cached={self.get_seq_length()}, voco_tokens={self.voco_tokens}, "
            f"images={self.num_images.tolist()}, next_position={self.next_position.tolist()})"
        )
