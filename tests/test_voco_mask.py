"""The mask rule (docs/design.md §2.2) against matrices written out by hand, and its errors."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.masking_utils import create_causal_mask

from llava_voco import VoCoLayout, VoCoLayoutError, VoCoLlavaConfig

IMG, VOCO, PAD = 90, 91, 0  # ids for these unit tests only; the model reads them from its config


def layout(ids, attention_mask=None, k=1, mode="paper", **kw):
    return VoCoLayout.from_input_ids(
        torch.tensor(ids), None if attention_mask is None else torch.tensor(attention_mask),
        image_token_id=IMG, voco_token_id=VOCO, voco_tokens=k, mode=mode, **kw,
    )


def matrix(rows: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row.split()] for row in rows.strip().splitlines()])


# docs/design.md §2.2 worked example: p0 p1 v0 v1 v2 c0 t0 t1
WORKED_IDS = [[1, 2, IMG, IMG, IMG, VOCO, 3, 4]]
WORKED_PAPER = matrix("""
1 . . . . . . .
1 1 . . . . . .
1 1 1 . . . . .
1 1 1 1 . . . .
1 1 1 1 1 . . .
1 1 1 1 1 1 . .
1 1 0 0 0 1 1 .
1 1 0 0 0 1 1 1
""")
WORKED_OFFICIAL = matrix("""
1 . . . . . . .
1 1 . . . . . .
1 1 1 . . . . .
1 1 1 1 . . . .
1 1 1 1 1 . . .
1 1 1 1 1 1 . .
0 0 0 0 0 1 1 .
0 0 0 0 0 1 1 1
""")


@pytest.mark.parametrize("mode,expected", [("paper", WORKED_PAPER), ("official", WORKED_OFFICIAL)])
def test_worked_example(mode, expected):
    mask = layout(WORKED_IDS, mode=mode).dense_mask()
    assert mask.shape == (1, 1, 8, 8) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], expected)


# Two images of 2 tokens, k=1: p0 a0 a1 ca t0 b0 b1 cb t1
MULTI_IDS = [[1, IMG, IMG, VOCO, 2, IMG, IMG, VOCO, 3]]
MULTI_PAPER = matrix("""
1 . . . . . . . .
1 1 . . . . . . .
1 1 1 . . . . . .
1 1 1 1 . . . . .
1 0 0 1 1 . . . .
1 0 0 1 1 1 . . .
1 0 0 1 1 1 1 . .
1 0 0 1 1 1 1 1 .
1 0 0 1 1 0 0 1 1
""")
MULTI_OFFICIAL = MULTI_PAPER.clone()
MULTI_OFFICIAL[8] = torch.tensor([0, 0, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool)


@pytest.mark.parametrize("mode,expected", [("paper", MULTI_PAPER), ("official", MULTI_OFFICIAL)])
def test_several_images(mode, expected):
    lay = layout(MULTI_IDS, mode=mode, num_images=2, tokens_per_image=2)
    assert lay.num_images.tolist() == [2]
    assert torch.equal(lay.dense_mask()[0, 0], expected)


def test_left_padded_batch_and_text_only_row():
    ids = [
        [PAD, PAD, 1, IMG, IMG, VOCO, 2],  # left padded
        [1, 2, IMG, IMG, VOCO, 3, 4],  # full
        [PAD, 5, 6, 7, 8, 9, 10],  # text only, padded
    ]
    attention = [[0, 0, 1, 1, 1, 1, 1], [1] * 7, [0, 1, 1, 1, 1, 1, 1]]
    lay = layout(ids, attention, k=1)
    mask = lay.dense_mask(torch.tensor(attention))
    assert torch.equal(mask[0, 0], matrix("""
0 0 0 0 0 0 0
0 0 0 0 0 0 0
0 0 1 0 0 0 0
0 0 1 1 0 0 0
0 0 1 1 1 0 0
0 0 1 1 1 1 0
0 0 1 0 0 1 1
"""))
    assert torch.equal(mask[1, 0], matrix("""
1 0 0 0 0 0 0
1 1 0 0 0 0 0
1 1 1 0 0 0 0
1 1 1 1 0 0 0
1 1 1 1 1 0 0
1 1 0 0 1 1 0
1 1 0 0 1 1 1
"""))
    causal_without_pad = torch.ones(7, 7, dtype=torch.bool).tril()
    causal_without_pad[:, 0] = False
    assert torch.equal(mask[2, 0], causal_without_pad)


def test_queries_offset_rows_match_full_mask():
    """Decoding steps ask for the last rows only; they must be the same rows."""
    lay = layout(MULTI_IDS)
    assert torch.equal(lay.dense_mask(q_offset=6), lay.dense_mask()[:, :, 6:])


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_transformers_mask_builder_gives_the_dense_mask(implementation):
    """The mask the model hands to the LLM (create_causal_mask + our and_mask_function) is the rule."""
    ids = torch.tensor([[PAD, 1, IMG, IMG, VOCO, 2, IMG, IMG, VOCO, 3], [1] * 4 + [IMG, IMG, VOCO, 4, 5, 6]])
    attention = (ids != PAD).long()
    for mode in ("paper", "official"):
        lay = VoCoLayout.from_input_ids(ids, attention, image_token_id=IMG, voco_token_id=VOCO, voco_tokens=1, mode=mode)
        config = LlamaConfig(hidden_size=8, num_attention_heads=1, num_hidden_layers=1)
        config._attn_implementation = implementation
        built = create_causal_mask(
            config=config, inputs_embeds=torch.empty(2, 10, 0), attention_mask=attention,
            past_key_values=None, and_mask_function=lay.mask_function(),
        )
        expected = lay.dense_mask(attention)
        if implementation == "eager":
            built = built == 0
        assert torch.equal(built, expected)


@pytest.mark.parametrize(
    "ids,k,kw,message",
    [
        ([[1, IMG, IMG, 2, 3]], 1, {}, "followed by 0 VoCo token"),
        ([[1, IMG, IMG, VOCO, 3]], 2, {}, "followed by 1 VoCo token(s), expected exactly voco_tokens=2"),
        ([[1, 2, VOCO, 3, 4]], 1, {}, "no image span right before"),
        ([[1, IMG, IMG, VOCO, 3]], 1, {"num_images": 2}, "1 image span(s) (per sample: [1]) but 2 image(s)"),
        ([[1, IMG, VOCO, IMG, IMG, VOCO]], 1, {"num_images": 2, "tokens_per_image": 2}, "image 1: the image span has 1"),
    ],
)
def test_errors_name_sample_and_problem(ids, k, kw, message):
    with pytest.raises(VoCoLayoutError) as error:
        layout(ids, k=k, **kw)
    assert message in str(error.value)
    assert "sample 0" in str(error.value) or "per sample" in str(error.value)


def test_error_names_the_right_row():
    ids = [[1, IMG, VOCO, 2], [1, IMG, 2, 3]]
    with pytest.raises(VoCoLayoutError, match=r"sample 1 \(batch row\), image 1"):
        layout(ids)


def test_mask_mode_validated():
    with pytest.raises(ValueError, match="voco_mask_mode must be one of"):
        VoCoLlavaConfig(voco_mask_mode="strict")
    with pytest.raises(ValueError, match="voco_mask_mode must be one of"):
        layout(WORKED_IDS, mode="causal")
