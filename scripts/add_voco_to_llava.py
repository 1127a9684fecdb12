"""Make a VoCo checkpoint from a LLaVA one (transformers format), the start of VoCo fine-tuning.

    python scripts/add_voco_to_llava.py --model-path llava-1.5-7b-hf --voco-tokens 1 --output-dir llava-voco-7b

A missing or incomplete model folder ends the script with one line on stderr.
"""

import argparse

import llava_voco
from llava_voco.engine import check_model_path
from llava_voco.errors import InputError, one_line_errors


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True, help="LlavaForConditionalGeneration checkpoint with processor")
    parser.add_argument("--voco-tokens", type=int, default=1)
    parser.add_argument("--voco-mask-mode", choices=llava_voco.MASK_MODES, default="paper")
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    with one_line_errors():
        check_model_path(args.model_path)
        try:
            model, _ = llava_voco.add_voco_to_llava(
                args.model_path, voco_tokens=args.voco_tokens, voco_mask_mode=args.voco_mask_mode,
                output_dir=args.output_dir,
            )
        except OSError as error:  # a Hub id that cannot be fetched, missing files, an output folder not writable
            raise InputError(f"{args.model_path} -> {args.output_dir}: {str(error).strip().splitlines()[0]}") from None
    print(f"saved {args.output_dir}: voco_tokens={model.config.voco_tokens}, <voco> id {model.config.voco_token_id}")


if __name__ == "__main__":
    main()
