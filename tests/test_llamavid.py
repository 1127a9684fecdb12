"""LLaMA-VID's projector: token counts, the context-attention formula, text guidance, gradients, chunks."""

import math

import pytest
import torch
from transformers import InstructBlipQFormerConfig, LlavaConfig
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from llava_voco.model.projectors import CompressTypeError, content_tokens_per_frame, parse_compress_type, pool_patches
from llava_voco.model.projectors.llamavid import LlamaVidProjector
from llava_voco.demo.tiny import train_wordpiece_tokenizer

VISION, TEXT, PATCHES = 32, 64, 16  # a 4 x 4 patch grid


@pytest.fixture(scope="module")
def bert_tokenizer():
    """A small WordPiece tokenizer trained here, as LLaMA-VID's text decoder uses BERT's."""
    return train_wordpiece_tokenizer()


@pytest.fixture
def projector(bert_tokenizer):
    torch.manual_seed(0)
    qformer = InstructBlipQFormerConfig(vocab_size=len(bert_tokenizer), hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64, encoder_hidden_size=VISION,
                                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    llava = LlavaConfig(vision_config={"model_type": "clip_vision_model", "hidden_size": VISION, "num_attention_heads": 4},
                        text_config={"model_type": "llama", "hidden_size": TEXT, "num_attention_heads": 4})
    return LlamaVidProjector(qformer, VISION, TEXT, LlavaMultiModalProjector(llava), num_query=4).eval()


def instructions(tokenizer, texts):
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


@pytest.mark.parametrize("spec,count", [("mean", 1), ("grid:1", 1), ("grid:2", 4), ("grid:4", 16), ("none", PATCHES)])
def test_token_counts(projector, bert_tokenizer, spec, count):
    frames = torch.randn(3, PATCHES, VISION)
    ids, mask = instructions(bert_tokenizer, ["what is the sum of the digits"] * 3)
    tokens = projector(frames, ids, mask, compress_type=spec)
    assert tokens.shape == (3, 1 + count, TEXT)
    assert content_tokens_per_frame(spec, PATCHES) == count


def test_grid_pooling_averages_each_cell():
    features = torch.arange(16.0).reshape(1, 16, 1)  # patch (r, c) holds 4r + c
    pooled = pool_patches(features, "grid:2")[0, :, 0]
    assert pooled.tolist() == [2.5, 4.5, 10.5, 12.5]


def test_context_attention_is_the_design_formula(projector, bert_tokenizer):
    frames = torch.randn(2, PATCHES, VISION)
    ids, mask = instructions(bert_tokenizer, ["which digit is at the top left", "describe the picture"])
    with torch.no_grad():
        context = projector(frames, ids, mask, compress_type="mean")[:, 0]
        queries = projector.text_queries(frames, ids, mask)  # Q_t, [2, M, C]
        expected = []
        for t in range(2):
            keys = frames[t] @ projector.key_projection.weight.T + projector.key_projection.bias
            weights = torch.softmax(queries[t] @ keys.T / math.sqrt(VISION), dim=-1)  # [M, N]
            e_t = (weights @ frames[t]).mean(dim=0)
            expected.append(projector.context_projection.weight @ e_t + projector.context_projection.bias)
    torch.testing.assert_close(context, torch.stack(expected), atol=1e-5, rtol=1e-5)


def test_context_depends_on_the_instruction_content_does_not(projector, bert_tokenizer):
    frame = torch.randn(1, PATCHES, VISION).expand(2, -1, -1)
    ids, mask = instructions(bert_tokenizer, ["which digit is at the top left", "how many times does seven appear"])
    with torch.no_grad():
        tokens = projector(frame, ids, mask, compress_type="grid:2")
    assert (tokens[0, 0] - tokens[1, 0]).abs().max() > 1e-4  # context tokens differ
    torch.testing.assert_close(tokens[0, 1:], tokens[1, 1:], atol=1e-6, rtol=0)  # content: same up to float noise


def test_gradients_reach_queries_decoder_and_projections(projector, bert_tokenizer):
    projector.train()
    frames = torch.randn(2, PATCHES, VISION)
    ids, mask = instructions(bert_tokenizer, ["what is the sum of the digits"] * 2)
    projector(frames, ids, mask, compress_type="mean").square().sum().backward()
    for name in ("query_tokens", "query_projection.weight", "key_projection.weight", "context_projection.weight",
                 "content_projector.linear_1.weight"):
        assert projector.get_parameter(name).grad.abs().sum() > 0, name
    decoder_grads = [p.grad for p in projector.text_decoder.parameters() if p.grad is not None]
    assert decoder_grads and sum(g.abs().sum() for g in decoder_grads) > 0


def test_chunked_equals_unchunked(projector, bert_tokenizer):
    frames = torch.randn(7, PATCHES, VISION)
    ids, mask = instructions(bert_tokenizer, ["what is the largest digit in frame three"] * 7)
    with torch.no_grad():
        whole = projector(frames, ids, mask, compress_type="grid:2", frame_chunk=64)
        chunked = projector(frames, ids, mask, compress_type="grid:2", frame_chunk=3)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("spec", ["grid", "grid:0", "grid:x", "pool", "mean:2"])
def test_malformed_compress_type(spec):
    with pytest.raises(CompressTypeError, match="malformed"):
        parse_compress_type(spec)


def test_grid_larger_than_patch_grid():
    with pytest.raises(CompressTypeError, match="larger than the 4 x 4 patch grid"):
        pool_patches(torch.randn(1, PATCHES, VISION), "grid:5")


def test_frame_features_file_in_chunks_equals_in_memory(projector, bert_tokenizer, tmp_path):
    from safetensors.torch import save_file

    from llava_voco.model.projectors.llamavid import FrameFeatures

    frames = torch.randn(10, PATCHES, VISION)
    save_file({"features": frames}, tmp_path / "clip.safetensors")
    stored = FrameFeatures(tmp_path / "clip.safetensors")
    assert len(stored) == 10 and torch.equal(stored[3:7], frames[3:7])
    ids, mask = instructions(bert_tokenizer, ["what is the sum of the digits"] * 10)
    save_file({"features": torch.randn(10, PATCHES, VISION + 1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="other.safetensors: features of width 33, but this model's vision tower gives 32"):
        projector(FrameFeatures(tmp_path / "other.safetensors"), ids, mask, "mean")
    with torch.no_grad():
        torch.testing.assert_close(projector(stored, ids, mask, "mean", frame_chunk=4),
                                   projector(frames, ids, mask, "mean", frame_chunk=64), atol=1e-6, rtol=1e-5)


def test_text_decoder_loads_from_an_instructblip_checkpoint(tmp_path):
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    from llava_voco.model.projectors.llamavid import load_text_decoder_from_instructblip

    qformer = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    config = InstructBlipConfig(
        vision_config={"hidden_size": VISION, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "image_size": 16, "patch_size": 4},
        qformer_config={**qformer, "encoder_hidden_size": VISION},
        text_config={"model_type": "opt", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                     "ffn_dim": 64, "vocab_size": 100, "word_embed_proj_dim": 32},
        num_query_tokens=4,
    )
    instructblip = InstructBlipForConditionalGeneration(config)
    with torch.no_grad():
        instructblip.query_tokens.normal_()
    instructblip.save_pretrained(tmp_path / "instructblip")

    llava = LlavaConfig(vision_config={"model_type": "clip_vision_model", "hidden_size": VISION, "num_attention_heads": 4},
                        text_config={"model_type": "llama", "hidden_size": TEXT, "num_attention_heads": 4})
    projector = LlamaVidProjector(InstructBlipQFormerConfig(**qformer, encoder_hidden_size=VISION), VISION, TEXT,
                                  LlavaMultiModalProjector(llava), num_query=4)
    load_text_decoder_from_instructblip(projector, tmp_path / "instructblip")
    for name, tensor in instructblip.qformer.state_dict().items():
        assert torch.equal(projector.text_decoder.state_dict()[name], tensor), name
    assert torch.equal(projector.query_tokens, instructblip.query_tokens)

    # with LLaMA-VID's input LayerNorm (vlm_att_ln), it starts from the vision model's post_layernorm
    with torch.no_grad():
        instructblip.vision_model.post_layernorm.weight.normal_()
        instructblip.vision_model.post_layernorm.bias.normal_()
    instructblip.save_pretrained(tmp_path / "instructblip")
    normed = LlamaVidProjector(InstructBlipQFormerConfig(**qformer, encoder_hidden_size=VISION), VISION, TEXT,
                               LlavaMultiModalProjector(llava), num_query=4, input_norm=True).eval()
    load_text_decoder_from_instructblip(normed, tmp_path / "instructblip")
    assert torch.equal(normed.text_decoder_input_norm.weight, instructblip.vision_model.post_layernorm.weight)
    assert torch.equal(normed.text_decoder_input_norm.bias, instructblip.vision_model.post_layernorm.bias)
    features = torch.randn(2, PATCHES, VISION)
    with torch.no_grad():  # the text decoder reads the features through it, as InstructBLIP's Q-Former does
        queries = normed.text_queries(features, *[t.expand(2, -1) for t in (torch.tensor([[2, 5, 3]]), torch.ones(1, 3, dtype=torch.long))])
        direct = normed.text_decoder(input_ids=torch.tensor([[2, 5, 3]]).expand(2, -1),
                                     attention_mask=torch.ones(2, 4 + 3, dtype=torch.long),
                                     query_embeds=normed.query_tokens.expand(2, -1, -1),
                                     encoder_hidden_states=instructblip.vision_model.post_layernorm(features)).last_hidden_state
        torch.testing.assert_close(queries, normed.query_projection(direct[:, :4]))

    wider = LlamaVidProjector(InstructBlipQFormerConfig(**qformer, encoder_hidden_size=VISION * 2), VISION * 2, TEXT,
                              LlavaMultiModalProjector(llava), num_query=4)
    with pytest.raises(ValueError, match="does not fit this text decoder"):
        load_text_decoder_from_instructblip(wider, tmp_path / "instructblip")
    # a text decoder with another vocabulary: the message names the tensor and both shapes
    other_vocabulary = LlamaVidProjector(InstructBlipQFormerConfig(**{**qformer, "vocab_size": 77}, encoder_hidden_size=VISION),
                                         VISION, TEXT, LlavaMultiModalProjector(llava), num_query=4)
    with pytest.raises(ValueError, match=r"embeddings\.word_embeddings\.weight: \(\d+, \d+\) there, \(77, \d+\) here"):
        load_text_decoder_from_instructblip(other_vocabulary, tmp_path / "instructblip")
