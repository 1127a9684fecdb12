"""Make tests/fixtures/parity/voco_llama/ with the released VoCo-LLaMA code (tests/fixtures/parity/README.md).

Runs in a separate environment with transformers 4.37.2, the released repository's overwritten
``modeling_attn_mask_utils.py`` copied over transformers' (as its README instructs), and the checkout first on
``PYTHONPATH``; nothing of that code is copied here, it is imported from ``--checkout``.

What it writes: a tiny ``llava_llama`` checkpoint in LLaVA's layout, saved by the released model class
(``save_pretrained``), whose vocabulary is compacted (below); the tiny CLIP vision tower it loads by path
(``vision_tower/``); and ``cases.safetensors``: the input ids the released code builds
(``<s> <image> \\n <voco><voco> \\n`` + prompt, as ``train_compress.preprocess_v1`` and
``model_vqa_loader`` write it), left padded, pixels, and the logits of the released forward (sdpa, the only
attention its VoCo mask is applied on).

Vocabulary: the released code hard-codes ``<voco>`` = 32000, so its model has 32001 rows. Only rows
0..TEXT_IDS-1 and 32000 are random; every other row of ``embed_tokens`` and ``lm_head`` is zero, so their
logits are exactly 0 (checked here) and the fixture keeps the TEXT_IDS + 1 live rows, ``<voco>`` last.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import sys
from pathlib import Path

import torch

TEXT_IDS = 64  # live text rows 0..63 (0 = unk = pad, 1 = <s>, 2 = </s>)
VOCO_ID = 32000  # the released code's literal
SEED = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", required=True, help="VoCo-LLaMA at commit 3b6e14d")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    checkout = Path(args.checkout).resolve()
    sys.path.insert(0, str(checkout))
    import transformers
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    assert transformers.__version__ == "4.37.2", transformers.__version__
    theirs = checkout / "llava/model/language_model/cache_py/modeling_attn_mask_utils.py"
    installed = Path(transformers.__file__).parent / "modeling_attn_mask_utils.py"
    if not filecmp.cmp(theirs, installed, shallow=False):
        raise SystemExit(f"copy {theirs} over {installed} first (the released code's install step)")
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.model.language_model.llava_llama_1stg import LlavaConfig, LlavaLlamaForCausalLM

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)

    # The vision tower, by path as LLaVA loads it (mm_vision_tower): 16 px, 8 px patches -> 4 patches.
    tower_dir = output / "vision_tower"
    tower_config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=16, patch_size=8, projection_dim=16)
    CLIPVisionModel(tower_config).save_pretrained(tower_dir, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(tower_dir)

    config = LlavaConfig(
        vocab_size=VOCO_ID + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        mm_vision_tower=str(tower_dir), mm_hidden_size=16, mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_patch_merge_type="flat",
        mm_use_im_start_end=False, mm_use_im_patch_token=False, image_aspect_ratio="square",
        tokenizer_padding_side="left", use_mm_proj=True,
    )
    config._attn_implementation = "sdpa"
    model = LlavaLlamaForCausalLM(config)
    model.get_model().get_vision_tower().load_model()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight") and not name.startswith("model.vision_tower."):  # the tower is vision_tower/'s
                parameter.normal_(1.0, 0.2)
        dead = torch.ones(VOCO_ID + 1, dtype=torch.bool)
        dead[:TEXT_IDS] = False
        dead[VOCO_ID] = False
        model.get_model().embed_tokens.weight[dead] = 0
        model.lm_head.weight[dead] = 0
    model.eval()

    # Token ids as the released prompt gives them: BOS, <image>, the "\n" before the VoCo run (LLaMA's
    # tokenizer gives two tokens, "▁" and "<0x0A>"; stand-ins here), 2 <voco>, "\n", the prompt.
    gap = [3, 4]
    newline = [4]
    def sample(prompt_length: int, answer_length: int) -> list[int]:
        prompt = torch.randint(5, TEXT_IDS, (prompt_length,)).tolist()
        answer = torch.randint(5, TEXT_IDS, (answer_length,)).tolist() + ([2] if answer_length else [])
        return [1, IMAGE_TOKEN_INDEX, *gap, VOCO_ID, VOCO_ID, *newline, *prompt, *answer]

    rows = {"train": [sample(9, 4), sample(5, 3)], "eval": [sample(7, 0)]}
    all_rows = rows["train"] + rows["eval"]
    length = max(len(row) for row in all_rows)
    input_ids = torch.zeros(len(all_rows), length, dtype=torch.long)  # left padded with unk (0), as the tokenizer
    attention_mask = torch.zeros(len(all_rows), length, dtype=torch.long)
    for index, row in enumerate(all_rows):
        input_ids[index, length - len(row):] = torch.tensor(row)
        attention_mask[index, length - len(row):] = 1
    pixel_values = torch.randn(len(all_rows), 3, 16, 16)

    with torch.no_grad():
        (_, _, embed_mask, _, _, _, voco_loc_back) = model.prepare_inputs_labels_for_multimodal(
            input_ids, None, attention_mask, None, None, pixel_values)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, images=pixel_values).logits.float()
    assert all(len(locs) == 2 for locs in voco_loc_back), voco_loc_back
    assert logits[..., dead].abs().max() == 0  # the dead rows: exactly 0, so the kept rows are the whole answer
    live = torch.cat([torch.arange(TEXT_IDS), torch.tensor([VOCO_ID])])

    # Greedy decoding of the eval prompt with the released generate(): recorded (README: its decode-time failure)
    completed = []  # query lengths of the language model's forwards that returned
    hook = model.get_model().register_forward_hook(
        lambda module, inputs, kwargs, output: completed.append(
            (kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]).shape[1]),
        with_kwargs=True)
    prompt_ids = input_ids[-1:, -len(rows["eval"][0]):]
    try:
        with torch.no_grad():
            generated = model.generate(prompt_ids, images=pixel_values[-1:], attention_mask=torch.ones_like(prompt_ids),
                                       max_new_tokens=3, do_sample=False, use_cache=True)
        decode = f"generated {generated.tolist()}"
    except Exception as error:  # recorded, not hidden: the fixture README quotes it
        import traceback

        frame = traceback.extract_tb(error.__traceback__)[-1]
        decode = (f"{type(error).__name__}: {error} (at {Path(frame.filename).name}:{frame.lineno}: {frame.line}), "
                  f"after language-model forwards of query lengths {completed}")
    hook.remove()
    print("released generate():", decode)

    model.save_pretrained(output / "released_full", safe_serialization=True)  # their own save, 32001 rows
    from safetensors.torch import load_file

    saved = load_file(str(output / "released_full" / "model.safetensors"))
    # the tower is loaded by path (vision_tower/), as for LLaVA's released checkpoints: its keys are left out
    compact = {name: (tensor[live].clone() if tensor.shape[0] == VOCO_ID + 1 else tensor) for name, tensor in saved.items()
               if not name.startswith("model.vision_tower.")}
    saved_config = json.loads((output / "released_full" / "config.json").read_text())
    saved_config["vocab_size"] = len(live)
    saved_config["mm_vision_tower"] = "vision_tower"  # relative to the checkpoint: the test hands the path over
    saved_config["voco_token_id"] = len(live) - 1  # where <voco> (32000) went in the compact vocabulary
    (output / "config.json").write_text(json.dumps(saved_config, indent=2, sort_keys=True) + "\n")
    save_file(compact, str(output / "model.safetensors"), metadata={"format": "pt"})
    for path in (output / "released_full").iterdir():
        path.unlink()
    (output / "released_full").rmdir()
    save_file({
        "input_ids": input_ids,  # released ids: IMAGE_TOKEN_INDEX (-200) and <voco> = 32000
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "embed_attention_mask": embed_mask.long(),  # after the image's features are spliced in (left padded)
        "logits": logits[..., live].contiguous(),  # [rows, embedded length, TEXT_IDS + 1]
        "train_rows": torch.tensor([0, 1]),
        "eval_rows": torch.tensor([2]),
    }, str(output / "cases.safetensors"))
    (output / "decode.txt").write_text(decode + "\n")
    print("wrote", output, "logits", tuple(logits.shape), "max |logit|", float(logits.abs().max()))


if __name__ == "__main__":
    main()
