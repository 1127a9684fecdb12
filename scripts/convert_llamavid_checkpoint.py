"""Convert a checkpoint written by LLaMA-VID's own code (e.g. llama-vid-7b-full-336) into this package's format.

    python scripts/convert_llamavid_checkpoint.py CHECKPOINT OUTPUT --bert-tokenizer bert-base-uncased/ \
        [--vision-tower eva_vit_g.pth] [--tokenizer FOLDER]

What maps to what, and what does not convert, is in ``llava_voco/model/llamavid_original.py``. The output is
a ``VoCoLlavaForConditionalGeneration`` folder (``mm_projector_type="llamavid"``) with the text decoder's
tokenizer in ``text_decoder_tokenizer/`` and, when the LLM's tokenizer is known, the whole processor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="folder written by LLaMA-VID (config.json with bert_type)")
    parser.add_argument("output", type=Path)
    parser.add_argument("--bert-tokenizer", required=True, type=Path,
                        help="bert-base-uncased's folder (vocab.txt, config.json): LLaMA-VID loads it by name, never saves it")
    parser.add_argument("--vision-tower", type=Path, default=None,
                        help="the vision tower's weights when the checkpoint lacks them: eva_vit_g.pth, or a CLIP folder")
    parser.add_argument("--vision-num-heads", type=int, default=None, help="EVA tower heads (default: width // 88)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="the LLM's tokenizer (default: the checkpoint's)")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from llava_voco.model.llamavid_original import LlamaVidCheckpointError, convert_llamavid_original, processor_for_converted

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer)) if args.tokenizer is not None else None
        model, text_decoder_tokenizer, tokenizer = convert_llamavid_original(
            args.checkpoint, args.bert_tokenizer, vision_tower=args.vision_tower, vision_num_heads=args.vision_num_heads,
            tokenizer=tokenizer,
        )
    except (LlamaVidCheckpointError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    model.save_pretrained(args.output)
    if tokenizer is not None:
        processor = processor_for_converted(model.config, tokenizer, text_decoder_tokenizer)
        processor.save_pretrained(args.output)
        saved = "model and processor"
    else:
        from llava_voco.model.processing_voco_llava import TEXT_DECODER_TOKENIZER_DIR

        text_decoder_tokenizer.save_pretrained(args.output / TEXT_DECODER_TOKENIZER_DIR)
        saved = "model and text decoder tokenizer (no LLM tokenizer: give --tokenizer for the processor)"
    print(f"{args.checkpoint} -> {args.output}: {saved}; image_token_id={model.config.image_token_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
