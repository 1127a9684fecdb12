"""The VoCo attention rule (docs/design.md §2.2), in one place.

Every backend derives its mask from :class:`VoCoLayout`: the dense boolean mask below, the 4D masks
transformers builds for eager / sdpa / flex through ``create_causal_mask(and_mask_function=...)``,
and (later) the flash-attn varlen segments. The rule, on top of causality and padding:

    a token that comes after the last VoCo token of image m may not attend to the vision tokens
    of image m.

Torch only (no transformers import), so that the same file carries the rule into an upstream LLaVA
checkout (``patches/``). It reduces to one number per key: the last query position allowed to see it
(``key_visible_until``). Vision keys of an image followed by VoCo tokens are visible up to that
image's last VoCo token; every other key is visible forever. ``official`` mode adds, per sample,
that queries after the last VoCo token see nothing before the first VoCo token, and accepts other tokens
between an image and its VoCo run (the released VoCo-LLaMA layout, ``<image>\n<voco><voco>``): they are
hidden with the image's vision tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch

MASK_MODES = ("paper", "official")
# "visible to every later query": larger than any position a sequence can have.
NEVER_HIDDEN = torch.iinfo(torch.int64).max // 2

_OTHER, _VISION, _VOCO = 0, 1, 2


class VoCoLayoutError(ValueError):
    """The token sequence does not have the image/VoCo structure the mask rule needs."""


def packed_sample_index(position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """``[batch, seq]`` sample of each position when rows are packed (position ids restart at 0 for each
    sample, docs/design.md §2.6), else None. Left padding (positions 1, 1, ..., 0, 1, 2) is not packing."""
    if position_ids is None or position_ids.ndim != 2 or position_ids.shape[1] < 2:
        return None
    starts = position_ids == 0
    samples = starts.long().cumsum(1)
    real_starts = starts[:, 1:] & (position_ids[:, :-1] >= position_ids[:, 1:]) & (samples[:, :-1] > 0)
    if not bool(real_starts.any()):
        return None
    return samples.clamp(min=1) - 1


def _expected_k(allowed_k: list[int]) -> str:
    if len(allowed_k) == 1:
        return f"exactly voco_tokens={allowed_k[0]}"
    return f"a number of the model's VoCo counts {allowed_k}"


def check_mask_mode(mode: str) -> str:
    if mode not in MASK_MODES:
        raise ValueError(f"voco_mask_mode must be one of {MASK_MODES}, got {mode!r}")
    return mode


@dataclass
class VoCoLayout:
    """Where the vision and VoCo tokens of a batch are, reduced to what the mask rule reads.

    Positions are indices into the full sequence (past tokens included), so one layout serves
    prefill and every decoding step of ``generate``.
    """

    key_visible_until: torch.Tensor  # [batch, seq] last query position allowed to see each key
    first_voco: torch.Tensor  # [batch, seq] first VoCo token of the position's sample (0 if none)
    text_start: torch.Tensor  # [batch, seq] position after its sample's last VoCo token (NEVER_HIDDEN if none)
    num_images: torch.Tensor  # [batch] image spans per row
    mode: str = "paper"
    # [batch, seq] sample of each position in a packed row (docs/design.md §2.6): no token reads another
    # sample; None when each row is one sample
    sample_index: torch.Tensor | None = None

    @property
    def has_voco(self) -> bool:
        return bool((self.text_start < NEVER_HIDDEN).any())

    @property
    def has_rule(self) -> bool:
        """Whether the mask differs from causal + padding: VoCo tokens, or packed samples."""
        return self.has_voco or self.sample_index is not None

    @classmethod
    def packed_only(cls, sample_index: torch.Tensor, mode: str = "paper") -> "VoCoLayout":
        """Packed rows without VoCo (``voco_tokens=0``): only "no token reads another sample"."""
        batch_size, seq_len = sample_index.shape
        never = torch.full((batch_size, seq_len), NEVER_HIDDEN, dtype=torch.long, device=sample_index.device)
        return cls(never, torch.zeros_like(never), never.clone(), torch.zeros(batch_size, dtype=torch.long,
                   device=sample_index.device), mode, sample_index)

    @classmethod
    def from_input_ids(
        cls,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        image_token_id: int,
        voco_token_id: int,
        voco_tokens: int | Sequence[int],
        mode: str = "paper",
        num_images: int | None = None,
        tokens_per_image: int | Sequence[int] | None = None,
        sample_index: torch.Tensor | None = None,
    ) -> "VoCoLayout":
        """Find each image span and its VoCo span, vectorised over the batch.

        Raises :class:`VoCoLayoutError` naming the sample (batch row) when an image span is not
        followed by exactly ``voco_tokens`` VoCo tokens (in ``official`` mode, right away or after other
        tokens), when VoCo tokens follow no image, or when
        the spans disagree with ``num_images`` / ``tokens_per_image`` (known when pixels are given: one count
        for every image, or one per image of the batch in token order). ``sample_index`` ``[batch, seq]``: the
        sample of each position in packed rows (``packed_sample_index``); an image span may not cross samples.
        """
        check_mask_mode(mode)
        allowed_k = sorted({voco_tokens} if isinstance(voco_tokens, int) else set(voco_tokens))
        if not allowed_k or allowed_k[0] < 1:
            raise ValueError(f"a VoCo layout needs voco_tokens >= 1, got {voco_tokens}")
        batch_size, seq_len = input_ids.shape
        device = input_ids.device
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        is_vision = (input_ids == image_token_id) & real
        is_voco = (input_ids == voco_token_id) & real
        kind = is_vision.long() * _VISION + is_voco.long() * _VOCO  # [batch, seq]
        # Packed samples are numbered apart in every row, so that nothing is matched across them.
        group = (torch.arange(batch_size, device=device)[:, None] * (seq_len + 1)
                 + (sample_index.to(device) if sample_index is not None else 0)).expand(batch_size, seq_len)

        # Runs of equal kind, never crossing a row or sample boundary.
        flat_kind = kind.reshape(-1)
        flat_group = group.reshape(-1)
        run_begins = torch.ones_like(flat_kind, dtype=torch.bool)
        run_begins[1:] = (flat_kind[1:] != flat_kind[:-1]) | (flat_group[1:] != flat_group[:-1])
        run_begins[::seq_len] = True
        run_start = run_begins.nonzero().squeeze(1)  # [runs] flat index
        run_kind = flat_kind[run_start]
        run_len = torch.diff(run_start, append=run_start.new_tensor([flat_kind.numel()]))
        run_sample = run_start // seq_len  # the batch row
        run_group = flat_group[run_start]
        run_of_token = run_begins.long().cumsum(0) - 1  # [batch*seq]

        def shifted(values: torch.Tensor, step: int, fill: int) -> torch.Tensor:
            out = torch.full_like(values, fill)
            if step > 0:
                out[:-step] = values[step:]
            else:
                out[-step:] = values[:step]
            return out

        next_kind, next_len, next_sample = shifted(run_kind, 1, -1), shifted(run_len, 1, 0), shifted(run_group, 1, -1)
        prev_kind, prev_sample = shifted(run_kind, -1, -1), shifted(run_group, -1, -1)
        vision_run = run_kind == _VISION
        voco_run = run_kind == _VOCO
        # official mode: other tokens may stand between an image and its VoCo run (the released code writes
        # "<image>\n<voco><voco>"); they belong to the image's block and are hidden with its vision tokens
        official = mode == "official"
        after_next_kind, after_next_len = shifted(run_kind, 2, -1), shifted(run_len, 2, 0)
        after_next_sample = shifted(run_group, 2, -1)
        voco_next = vision_run & (next_kind == _VOCO) & (next_sample == run_group)
        voco_after_gap = (vision_run & (next_kind == _OTHER) & (next_sample == run_group)
                          & (after_next_kind == _VOCO) & (after_next_sample == run_group) & official)
        gap_run = shifted(voco_after_gap, -1, False)  # the other-token run of such an image
        image_index = vision_run.long().cumsum(0) - 1  # global image number of each vision run
        sample_first_image = torch.zeros(batch_size, dtype=torch.long, device=device)
        images_per_sample = torch.zeros(batch_size, dtype=torch.long, device=device).index_add_(
            0, run_sample, vision_run.long()
        )
        sample_first_image[1:] = images_per_sample.cumsum(0)[:-1]

        def image_name(run: int) -> str:
            sample = int(run_sample[run])
            nth = int(image_index[run] - sample_first_image[sample]) + 1
            return f"sample {sample} (batch row), image {nth}"

        followed_by_voco = voco_next | voco_after_gap
        voco_len = torch.where(voco_after_gap, after_next_len, torch.where(voco_next, next_len, 0))  # the image's k
        k_allowed = torch.isin(voco_len, torch.tensor(allowed_k, device=device))
        bad = vision_run & ~(followed_by_voco & k_allowed)
        if bad.any():
            run = int(bad.nonzero()[0])
            found = int(voco_len[run])
            gapped = (int(next_kind[run]) == _OTHER and int(after_next_kind[run]) == _VOCO
                      and int(after_next_sample[run]) == int(run_group[run]) and not official)
            raise VoCoLayoutError(
                f"{image_name(run)}: the image span (positions {int(run_start[run] % seq_len)}.."
                f"{int((run_start[run] + run_len[run] - 1) % seq_len)}) is followed by {found} VoCo "
                f"token(s), expected {_expected_k(allowed_k)} " + (
                    "(other tokens stand between it and its VoCo run: only voco_mask_mode='official' "
                    "accepts that, the released VoCo-LLaMA layout)" if gapped
                    else "(truncated, or built without VoCoLlavaProcessor?)")
            )
        orphan = voco_run & ~(((prev_kind == _VISION) & (prev_sample == run_group)) | shifted(gap_run, -1, False))
        if orphan.any():
            run = int(orphan.nonzero()[0])
            raise VoCoLayoutError(
                f"sample {int(run_sample[run])} (batch row): VoCo token(s) at position "
                f"{int(run_start[run] % seq_len)} with no image span right before them"
            )
        total_images = int(vision_run.sum())
        if num_images is not None and total_images != num_images:
            raise VoCoLayoutError(
                f"the batch has {total_images} image span(s) (per sample: {images_per_sample.tolist()}) "
                f"but {num_images} image(s) were given"
            )
        if tokens_per_image is not None:
            if isinstance(tokens_per_image, int):
                expected = torch.full_like(run_len, tokens_per_image)
            else:
                per_image = torch.as_tensor(list(tokens_per_image), dtype=torch.long, device=device)
                expected = per_image[image_index.clamp(0, max(len(per_image) - 1, 0))] if len(per_image) else run_len
            wrong = vision_run & (run_len != expected)
            if wrong.any():
                run = int(wrong.nonzero()[0])
                raise VoCoLayoutError(
                    f"{image_name(run)}: the image span has {int(run_len[run])} image tokens but the "
                    f"image gives {int(expected[run])} features"
                )

        # Per key: the last query allowed to see it.
        # each image's k is the length of its VoCo run (one k per model, or any of an elastic model's)
        voco_start = torch.where(voco_after_gap, shifted(run_start, 2, 0), shifted(run_start, 1, 0))
        last_voco_of_run = (voco_start + voco_len - 1) % seq_len
        run_visible_until = torch.where(vision_run, last_voco_of_run, torch.full_like(run_start, NEVER_HIDDEN))
        # an image's gap tokens (official mode) are hidden with its vision tokens
        run_visible_until = torch.where(gap_run, shifted(run_visible_until, -1, NEVER_HIDDEN), run_visible_until)
        key_visible_until = run_visible_until[run_of_token].view(batch_size, seq_len)

        # Per sample (a row, or a packed sample of it): its first VoCo token and where its text starts.
        positions = torch.arange(seq_len, device=device).expand(batch_size, seq_len)
        groups = group.reshape(-1)
        slots = batch_size * (seq_len + 1)
        first = torch.full((slots,), seq_len, dtype=torch.long, device=device).scatter_reduce(
            0, groups, torch.where(is_voco, positions, seq_len).reshape(-1), reduce="amin")
        last = torch.full((slots,), -1, dtype=torch.long, device=device).scatter_reduce(
            0, groups, torch.where(is_voco, positions, -1).reshape(-1), reduce="amax")
        has_voco = last[group] >= 0  # [batch, seq]
        first_voco = torch.where(has_voco, first[group], 0)
        text_start = torch.where(has_voco, last[group] + 1, NEVER_HIDDEN)
        return cls(key_visible_until, first_voco, text_start, images_per_sample, mode, sample_index)

    @classmethod
    def continuing(
        cls,
        new_tokens: "VoCoLayout | None",
        *,
        cache_length: int,
        cache_first_voco: torch.Tensor,
        batch_size: int,
        query_length: int,
        mode: str,
    ) -> "VoCoLayout":
        """The layout of (cache, new tokens) for a forward that continues a compressed cache.

        The cache holds only keys that later tokens may read, so none of them is hidden by the rule; in
        ``official`` mode, text (what follows the last VoCo token, in the cache or in the new tokens) may
        still not read the cached positions before the first VoCo token (``cache_first_voco``, per row, -1
        when the cache holds no VoCo token). ``new_tokens`` is the layout of the new tokens alone (None when
        they hold no image).
        """
        device = cache_first_voco.device
        cached = torch.full((batch_size, cache_length), NEVER_HIDDEN, dtype=torch.long, device=device)
        cache_has_voco = cache_first_voco >= 0
        if new_tokens is None:
            new_visible = torch.full((batch_size, query_length), NEVER_HIDDEN, dtype=torch.long, device=device)
            new_first_voco = torch.zeros(batch_size, dtype=torch.long, device=device)
            new_text_start = torch.full_like(new_first_voco, NEVER_HIDDEN)
            num_images = torch.zeros(batch_size, dtype=torch.long, device=device)
        else:
            def shift(positions: torch.Tensor) -> torch.Tensor:
                return torch.where(positions < NEVER_HIDDEN, positions + cache_length, positions)

            new_visible = shift(new_tokens.key_visible_until)
            # new tokens are one sample per row: its values are those of any position
            new_first_voco, new_text_start = new_tokens.first_voco[:, 0] + cache_length, shift(new_tokens.text_start[:, 0])
            num_images = new_tokens.num_images
        new_has_voco = new_text_start < NEVER_HIDDEN
        # text starts after the last VoCo token: in the new tokens if they hold one, else every new token is text
        text_start = torch.where(
            new_has_voco, new_text_start,
            torch.where(cache_has_voco, torch.full_like(new_text_start, cache_length), new_text_start),
        )
        first_voco = torch.where(cache_has_voco, cache_first_voco, torch.where(new_has_voco, new_first_voco, 0))
        length = cache_length + query_length
        return cls(torch.cat([cached, new_visible], dim=1), first_voco[:, None].expand(-1, length),
                   text_start[:, None].expand(-1, length), num_images, mode)

    def visible_to(self, query_position: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[batch, seq]``: which keys a query at ``query_position[b]`` may read: what a cache must keep."""
        batch_size, seq_len = self.key_visible_until.shape
        device = self.key_visible_until.device
        batch_idx = torch.arange(batch_size, device=device)[:, None]
        kv_idx = torch.arange(seq_len, device=device)[None, :]
        head_idx = torch.zeros(1, 1, dtype=torch.long, device=device)
        return self.full_mask_function(attention_mask)(batch_idx, head_idx, query_position.to(device)[:, None], kv_idx)

    def mask_function(self) -> Callable:
        """The VoCo rule alone, as ``(batch, head, q_idx, kv_idx) -> bool`` (transformers / flex).

        Index-based, so it works broadcast, under ``vmap`` and inside flex's ``create_block_mask``;
        combine it with causality and padding (``create_causal_mask(and_mask_function=...)``).
        """
        key_visible_until, first_voco, text_start = self.key_visible_until, self.first_voco, self.text_start
        sample_index = self.sample_index
        official = self.mode == "official"

        def voco_rule(batch_idx, head_idx, q_idx, kv_idx):
            allowed = q_idx <= key_visible_until[batch_idx, kv_idx]
            if sample_index is not None:
                allowed = allowed & (sample_index[batch_idx, q_idx] == sample_index[batch_idx, kv_idx])
            if official:
                allowed = allowed & ((q_idx < text_start[batch_idx, q_idx]) | (kv_idx >= first_voco[batch_idx, q_idx]))
            return allowed

        return voco_rule

    def full_mask_function(self, attention_mask: torch.Tensor | None = None) -> Callable:
        """Causal & padding & VoCo: the whole mask as one index function (``attention_mask``: ``[batch, kv]``,
        1 for real tokens)."""
        voco_rule = self.mask_function()
        padding = attention_mask.bool() if attention_mask is not None else None

        def full_mask(batch_idx, head_idx, q_idx, kv_idx):
            allowed = (kv_idx <= q_idx) & voco_rule(batch_idx, head_idx, q_idx, kv_idx)
            if padding is not None:
                allowed = allowed & padding[batch_idx, kv_idx]
            return allowed

        return full_mask

    def dense_mask(
        self,
        attention_mask: torch.Tensor | None = None,
        q_offset: int = 0,
        q_length: int | None = None,
    ) -> torch.Tensor:
        """Boolean mask ``[batch, 1, q_length, seq]`` (True = may attend), by broadcasting."""
        batch_size, kv_length = self.key_visible_until.shape
        q_length = kv_length - q_offset if q_length is None else q_length
        device = self.key_visible_until.device
        batch_idx = torch.arange(batch_size, device=device)[:, None, None, None]
        head_idx = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
        q_idx = torch.arange(q_offset, q_offset + q_length, device=device)[None, None, :, None]
        kv_idx = torch.arange(kv_length, device=device)[None, None, None, :]
        mask = self.full_mask_function(attention_mask)(batch_idx, head_idx, q_idx, kv_idx)
        return mask.expand(batch_size, 1, q_length, kv_length)
