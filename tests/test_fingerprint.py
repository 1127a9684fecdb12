"""The model fingerprint that keys caches reads every weight, and is computed once per loaded model."""

import hashlib

import torch
from torch import nn
from transformers import PretrainedConfig

from llava_voco.model import voco_cache
from llava_voco.model.voco_cache import model_fingerprint

from conftest import load_voco


class EmbeddingOnly(nn.Module):
    """LLaMA-7B's input embedding with ``<voco>`` added: 32,001 rows of 4,096 (bf16, 262 MB)."""

    def __init__(self):
        super().__init__()
        self.config = PretrainedConfig()
        self.embed_tokens = nn.Embedding(32001, 4096, dtype=torch.bfloat16, _weight=torch.zeros(32001, 4096,
                                                                                                 dtype=torch.bfloat16))


def test_the_voco_row_of_a_7b_embedding_changes_the_fingerprint():
    """Sampling 4,096 values per parameter with a stride never read row 32,000 (``<voco>``, the row VoCo
    trains): two checkpoints differing only there shared caches."""
    model = EmbeddingOnly()
    before = model_fingerprint(model)
    with torch.no_grad():
        model.embed_tokens.weight[32000, 4095] = 1.0
    assert model_fingerprint(model) != before


def test_computed_once_per_loaded_model_and_again_after_a_weight_changes(voco_dir, digit_images, monkeypatch):
    model, processor = load_voco(voco_dir)
    digests, sha256 = [], hashlib.sha256

    def counting_sha256(*args):
        digests.append(1)
        return sha256(*args)

    monkeypatch.setattr(voco_cache.hashlib, "sha256", counting_sha256)  # the hashes the fingerprint starts
    first = model_fingerprint(model)
    text = "USER: <image>\nWhat is the sum? ASSISTANT:"
    for image in digit_images[:3]:  # every compression records the fingerprint in its cache
        cache = model.compress(**processor(images=image, text=text, return_tensors="pt"))
        assert cache.fingerprint == first
    assert len(digests) == 1
    voco_id = model.config.voco_token_id
    with torch.no_grad():  # one value of the <voco> row, in place
        model.get_input_embeddings().weight[voco_id, -1] += 1.0
    changed = model_fingerprint(model)
    assert changed != first and len(digests) == 2
    model.config.voco_mask_mode = "official"
    assert model_fingerprint(model) not in (first, changed)
