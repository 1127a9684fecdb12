"""Convert a checkpoint written by LLaVA's own train.py (``model_type: llava_llama`` / ``llava_mistral``, LLaVA's
key layout) into ours (transformers' Llava layout, ``voco_llava``): ``from_pretrained`` then loads it alone.

    python scripts/convert_llava_checkpoint.py LLAVA_DIR OUTPUT_DIR [--vision-tower CLIP_DIR]
    # a VoCo-LLaMA checkpoint (<voco> in its tokenizer): converted with k = 2 and voco_mask_mode official,
    # as the released code trains; --voco-tokens / --voco-mask-mode override

The tower: LLaVA names it in ``mm_vision_tower`` (usually a Hub name) and its releases do not carry it; give its
folder with ``--vision-tower`` unless ``mm_vision_tower`` is a local folder. With a tokenizer in LLAVA_DIR the
processor is written too (``<image>`` added as the row the conversion appends; ``<voco>`` found by name).
``llava_voco.inference.load_model`` (chat, model_vqa, serve) converts such a folder on the fly, in memory, when its
tower is local; the training entry refuses it naming this script (convert once, then train from the output).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llava_voco.model.llava_original import LlavaCheckpointError, convert_llava_original, llava_processor  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("llava_dir")
    parser.add_argument("output_dir")
    parser.add_argument("--vision-tower", default=None, help="the CLIP tower's folder (when mm_vision_tower is a Hub name)")
    parser.add_argument("--voco-tokens", type=int, default=None,
                        help="VoCo tokens per image it was trained with (default: 2 when its tokenizer has <voco>, as "
                             "the released VoCo-LLaMA code, else 0)")
    parser.add_argument("--voco-token-id", type=int, default=None,
                        help="id of <voco> (default: the tokenizer's, or the config's voco_token_id)")
    parser.add_argument("--voco-mask-mode", default=None, choices=["paper", "official"],
                        help="default: official for a VoCo-LLaMA checkpoint (the released code's mask), else paper")
    args = parser.parse_args(argv)
    try:
        model = convert_llava_original(args.llava_dir, vision_tower=args.vision_tower, voco_tokens=args.voco_tokens,
                                       voco_token_id=args.voco_token_id, voco_mask_mode=args.voco_mask_mode)
        processor = llava_processor(args.llava_dir, model, vision_tower=args.vision_tower)
    except (LlavaCheckpointError, ValueError, OSError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    model.save_pretrained(args.output_dir)
    if processor is not None:
        processor.save_pretrained(args.output_dir)
    print(f"wrote {args.output_dir}" + ("" if processor is not None else " (no tokenizer in the source: model only)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
