"""Precompute the vision tower's frame features of long videos, for LLaMA-VID.

    python scripts/extract_video_features.py --model-path DIR --video-folder videos/ --output-folder features/
        [--video-fps 1] [--max-frames N]

Every video file (or folder of frame images) in ``--video-folder`` becomes
``<output-folder>/<name>.safetensors`` holding one tensor ``features`` ``[frames, patches, dim]`` (the
model's selected vision layer, CLS dropped as its config says). Such a file is a video wherever one is
accepted (``"video": "name.safetensors"`` in training data, ``processor(videos=[path])``, the CLI and
eval), skipping the vision tower; ``llava_voco.frame_features.FrameFeatures`` reads one a chunk at a
time for the LLaMA-VID token stage. Frames go through the tower
``frame_chunk`` at a time; existing outputs are skipped, so an interrupted run resumes. A user's mistake
(a missing folder or model, an unreadable video) ends the run with one line on stderr.
"""

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from llava_voco.engine import check_model_path, load_model
from llava_voco.errors import InputError, one_line_errors
from llava_voco.video import IMAGE_SUFFIXES, VIDEO_SUFFIXES, decode_video


def videos_in(folder: Path) -> list[Path]:
    found = []
    for path in sorted(folder.iterdir()):
        if path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
            found.append(path)
        elif path.suffix.lower() in VIDEO_SUFFIXES:
            found.append(path)
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--video-folder", required=True)
    parser.add_argument("--output-folder", required=True)
    parser.add_argument("--video-fps", type=float, default=1.0)
    parser.add_argument("--max-frames", type=int, default=None)
    args = parser.parse_args(argv)
    with one_line_errors():
        extract(args)


def extract(args) -> None:
    check_model_path(args.model_path)  # every argument is checked before the model loads
    if not Path(args.video_folder).is_dir():
        raise InputError(f"{args.video_folder}: no such folder of videos")
    videos = videos_in(Path(args.video_folder))
    if not videos:
        raise InputError(f"{args.video_folder}: no video files ({', '.join(sorted(VIDEO_SUFFIXES))}) or frame folders")
    model, processor = load_model(args.model_path)
    output = Path(args.output_folder)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{output}: cannot create the output folder: {error.strerror or error}") from None
    written = 0
    for video in tqdm(videos, desc="videos", unit="video"):
        target = output / f"{video.stem if video.is_file() else video.name}.safetensors"
        if target.exists():
            continue
        frames = decode_video(video, fps=args.video_fps, max_frames=args.max_frames)  # VideoError: one line
        pixel_values = processor.image_processor(frames, return_tensors="pt")["pixel_values"].to(model.device)
        with torch.no_grad():
            features = model.model.vision_patch_features(pixel_values).to("cpu").contiguous()
        save_file({"features": features}, target, metadata={
            "source": str(video), "video_fps": str(args.video_fps), "model": str(args.model_path),
        })
        written += 1
    print(f"wrote {written} feature file(s) to {output} ({len(videos) - written} already there)")


if __name__ == "__main__":
    main()
