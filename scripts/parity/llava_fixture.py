"""Make tests/fixtures/parity/llava/ with LLaVA's own code (tests/fixtures/parity/README.md).

Runs in a separate environment with transformers 4.37.2 (pristine) and LLaVA v1.2.2's ``llava/`` (the
``llava-torch==1.2.2.post1`` wheel, unpacked) first on ``PYTHONPATH``; its code is imported from ``--sources``,
nothing of it is copied here.

For ``llava_llama`` (``mlp2x_gelu`` projector) and ``llava_mistral`` (``linear``), a tiny model is built and its
vision modules set up as LLaVA's ``train.py`` does (``initialize_vision_modules``), then written with LLaVA's
``save_pretrained``: the llama one without the tower's weights and with a Hub name as ``mm_vision_tower`` (as
LLaVA's released checkpoints: the tower is loaded by name), the mistral one with them and a relative path.
``cases.safetensors`` in each: ids with ``IMAGE_TOKEN_INDEX`` (-200), right padding (LLaVA's default), one
row with an image and one without, pixels, and the logits of LLaVA's forward (sdpa).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

VOCAB = 64  # 0 = unk = pad, 1 = <s>, 2 = </s>
SEED = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", required=True, help="the llava-torch==1.2.2.post1 wheel, unpacked (holds llava/)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.sources).resolve()))
    import transformers
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    assert transformers.__version__ == "4.37.2", transformers.__version__
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
    from llava.model.language_model.llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    tower_dir = output / "vision_tower"
    tower_config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=16, patch_size=8, projection_dim=16)
    CLIPVisionModel(tower_config).save_pretrained(tower_dir, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(tower_dir)

    set_ups = {
        "llava_llama": (LlavaConfig, LlavaLlamaForCausalLM, "mlp2x_gelu", "openai/clip-vit-large-patch14-336", False),
        "llava_mistral": (LlavaMistralConfig, LlavaMistralForCausalLM, "linear", "../vision_tower", True),
    }
    for name, (config_class, model_class, projector, tower_name, keep_tower) in set_ups.items():
        config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                              initializer_range=0.2, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                              eos_token_id=2)
        config._attn_implementation = "sdpa"
        model = model_class(config)
        model_args = SimpleNamespace(  # train.py's ModelArguments, the fields initialize_vision_modules reads
            vision_tower=str(tower_dir), mm_vision_select_layer=-2, mm_vision_select_feature="patch",
            pretrain_mm_mlp_adapter=None, mm_patch_merge_type="flat", mm_projector_type=projector)
        model.get_model().initialize_vision_modules(model_args=model_args)
        model.config.image_aspect_ratio = "pad"
        model.config.tokenizer_padding_side = "right"
        model.config.mm_use_im_start_end = False
        model.config.mm_use_im_patch_token = False
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if parameter_name.endswith("norm.weight") and ".vision_tower." not in parameter_name:
                    parameter.normal_(1.0, 0.2)
                elif "mm_projector" in parameter_name:
                    parameter.normal_(0.0, 0.3)
        model.eval()

        rows = [[1, 7, IMAGE_TOKEN_INDEX, *torch.randint(3, VOCAB, (9,)).tolist()],
                [1, *torch.randint(3, VOCAB, (6,)).tolist()]]  # an image, and text only
        length = max(len(row) for row in rows)
        input_ids = torch.zeros(len(rows), length, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, :len(row)] = torch.tensor(row)
            attention_mask[index, :len(row)] = 1
        # LLaVA's batch holds an image per row; a text-only row's is read and left unused (train.py's zeros)
        pixel_values = torch.randn(len(rows), 3, 16, 16)
        with torch.no_grad():
            (_, _, embed_mask, _, _, _) = model.prepare_inputs_labels_for_multimodal(
                input_ids, None, attention_mask, None, None, pixel_values)
            logits = model(input_ids=input_ids, attention_mask=attention_mask, images=pixel_values).logits.float()

        folder = output / name
        model.config.mm_vision_tower = tower_name
        model.save_pretrained(folder, safe_serialization=True)
        if not keep_tower:
            from safetensors.torch import load_file

            weights = load_file(str(folder / "model.safetensors"))
            kept = {key: value for key, value in weights.items() if not key.startswith("model.vision_tower.")}
            assert len(kept) < len(weights)
            save_file(kept, str(folder / "model.safetensors"), metadata={"format": "pt"})
        save_file({"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                   "embed_attention_mask": embed_mask.long(), "logits": logits.contiguous()},
                  str(folder / "cases.safetensors"))
        print("wrote", folder, tuple(logits.shape), "max |logit|", float(logits.abs().max()))


if __name__ == "__main__":
    main()
