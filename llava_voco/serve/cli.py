"""Chat about an image from the terminal, like LLaVA's ``llava.serve.cli``; the image is compressed once.

    python -m llava_voco.serve.cli --model-path DIR --image-file IMG [--video-file VIDEO] [--conv-mode NAME]
        [--temperature 0.2] [--max-new-tokens 512] [--cache-dir DIR] [--video-fps 1] [--max-frames N]
        [--load-4bit | --load-8bit]

Each turn is answered from the VoCo cache made at start (or loaded from ``--cache-dir``, a
``VoCoCacheStore``), extended by the text of the conversation only. An empty line or end of input ends.
The prompt is the template the checkpoint was trained with (``--conv-mode`` overrides it), and the
speakers are named as that template names them. A user's mistake (a missing or
unreadable image, a missing model) ends the session with one line on stderr.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..conversation import get_template
from ..engine import add_model_arguments, conversation_template_of, model_kwargs_from_args
from ..errors import one_line_errors
from ..inference import (
    ImageChat,
    count_vision_passes,
    image_tokens_per_frame,
    load_images,
    load_model,
    read_video,
    role_names,
)
from ..video import VIDEO_SUFFIXES, is_frame_features
from .cache_store import VoCoCacheStore


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Chat about an image with a VoCo LLaVA model.")
    add_model_arguments(parser)
    parser.add_argument("--image-file", default=None, help="an image; several separated by commas")
    parser.add_argument("--video-file", default=None,
                        help="a video file (PyAV decodes it), a folder of frames, or frame features (.safetensors)")
    parser.add_argument("--video-fps", type=float, default=1.0)
    parser.add_argument("--max-frames", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--cache-dir", default=None, help="VoCo cache store: reuse compressed images across sessions")
    return parser.parse_args(argv)


def is_video(path: str) -> bool:
    """A video given as ``--image-file``: a file, a folder of frames, or precomputed frame features."""
    return Path(path).is_dir() or Path(path).suffix.lower() in VIDEO_SUFFIXES or is_frame_features(path)


def main(argv=None) -> None:
    with one_line_errors():
        _main(parse_args(argv))


def _main(args) -> None:
    if args.conv_mode is not None:
        get_template(args.conv_mode)  # an unknown name is refused before anything loads
    image_files = args.image_file.split(",") if args.image_file else []
    video_files = [path for path in image_files if is_video(path)] + ([args.video_file] if args.video_file else [])
    if not image_files and not video_files:
        raise SystemExit("give --image-file and/or --video-file")
    images = load_images([path for path in image_files if not is_video(path)])  # before the model: fail fast
    model, processor = load_model(args.model_path, **model_kwargs_from_args(args))
    template = conversation_template_of(processor, args.conv_mode)
    video = None
    if video_files:  # one video per conversation: the last one given
        video = read_video(video_files[-1], model, processor, fps=args.video_fps, max_frames=args.max_frames)
    generation = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        generation["temperature"] = args.temperature
    store = VoCoCacheStore(args.cache_dir) if args.cache_dir else None

    with count_vision_passes(model) as vision:
        chat = ImageChat(model, processor, template, images, store=store, generation_kwargs=generation, video=video)
        if video is not None:
            per_frame = image_tokens_per_frame(processor)
            print(f"[video: {len(video)} frames, {per_frame} tokens per frame]", flush=True)
        source = "loaded from the cache store" if chat.loaded_from_store else "compressed"
        if chat.cache is not None:
            what = f"{len(images)} image(s)" + (f" and a {len(video)}-frame video" if video is not None else "")
            print(f"[{source} {what}] {chat.cache_summary()}", flush=True)
        else:
            print(f"[{chat.cache_summary()}]", flush=True)
        user, assistant = role_names(template)
        turns = 0
        while True:
            try:
                question = input(f"{user}: ")
            except EOFError:
                question = ""
            if not question.strip():
                print("exit...")
                break
            print(f"{assistant}: ", end="", flush=True)
            for piece in chat.ask_streaming(question):
                print(piece, end="", flush=True)
            print(flush=True)
            turns += 1
        print(f"[session: {turns} turn(s), {vision['passes']} vision tower pass(es)]")


if __name__ == "__main__":
    main()
