"""Write a tiny, randomly initialised LLaVA checkpoint with its processor, in seconds and with nothing
downloaded: the quick start's model (it answers nonsense, but every code path runs on it).

    python scripts/make_tiny_llava.py tiny-llava [--image-size 16] [--seed 0]

A ``LlavaForConditionalGeneration`` (CLIP vision tower, Llama language model; about 0.1 M parameters at the
defaults) and a ``LlavaProcessor`` whose BPE tokenizer is trained on the spot (``llava_voco.demo.tiny``):
``scripts/add_voco_to_llava.py`` and ``AutoModelForImageTextToText.from_pretrained`` take it as they take
llava-1.5-7b-hf.
"""

import argparse
import os
import sys

from llava_voco.demo.tiny import TinySizes, build_tiny_llava


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="folder to write (must not hold a checkpoint already)")
    parser.add_argument("--image-size", type=int, default=TinySizes.image_size,
                        help="pixels per side; the vision tower's patches are 4 pixels, so (size / 4)^2 image tokens")
    parser.add_argument("--seed", type=int, default=0, help="weights' random seed")
    args = parser.parse_args(argv)
    if args.image_size < 4 or args.image_size % TinySizes.patch_size:
        parser.error(f"--image-size {args.image_size}: must be a positive multiple of {TinySizes.patch_size}")
    if os.path.exists(os.path.join(args.output_dir, "config.json")):
        print(f"make_tiny_llava: error: {args.output_dir} already holds a checkpoint (config.json)", file=sys.stderr)
        return 1
    model, _ = build_tiny_llava(args.output_dir, TinySizes(image_size=args.image_size), seed=args.seed)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"saved {args.output_dir}: a random tiny LLaVA ({parameters:,} parameters, "
          f"{model.config.image_seq_length} image tokens per {args.image_size}x{args.image_size} image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
