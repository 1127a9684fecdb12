"""The VoCo model builds its language model, vision tower and projector once: constructing it allocates
what constructing plain Llava allocates (ZeRO-3's zero.Init would otherwise allocate and partition a
throwaway model), for every projector."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlavaConfig, LlavaForConditionalGeneration

from llava_voco import VoCoLlavaConfig, VoCoLlavaForConditionalGeneration


class CountAllocations(TorchDispatchMode):
    """Bytes of every tensor an operator creates while the mode is on."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and func._schema.name.startswith("aten::empty"):
                self.bytes += tensor.numel() * tensor.element_size()
        return out


def allocated_while(build) -> int:
    with CountAllocations() as counter:
        build()
    return counter.bytes


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "linear", "pooled"])
def test_construction_allocates_what_llava_does(llava_dir, projector):
    llava_config = LlavaConfig.from_pretrained(llava_dir)
    values = {k: v for k, v in llava_config.to_dict().items() if k != "model_type"}
    overrides = {"linear": {"mm_projector_type": "linear"}, "pooled": {"vision_token_pooling": "mean"}}.get(projector, {})
    voco_config = VoCoLlavaConfig(**values, voco_tokens=1, voco_token_id=llava_config.image_token_id - 1,
                                  **overrides)
    llava = allocated_while(lambda: LlavaForConditionalGeneration(LlavaConfig(**values)))
    voco = allocated_while(lambda: VoCoLlavaForConditionalGeneration(voco_config))
    parameters = sum(p.numel() * p.element_size() for p in VoCoLlavaForConditionalGeneration(voco_config).parameters())
    assert voco <= 1.1 * llava, (voco, llava)
    assert voco <= 1.1 * parameters  # nothing built twice
