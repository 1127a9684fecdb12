"""Video decoding: a real video file encoded here with PyAV, frame folders, sampling and errors."""

import av  # the video extra; `make test` installs it
import numpy as np
import pytest
from PIL import Image

from llava_voco.video import VideoError, decode_video, sample_indices


def write_video(path, frames: int, rate: int = 4):
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for index in range(frames):
            pixels = np.full((32, 32, 3), index * 10 % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_file_at_one_frame_per_second(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, frames=20, rate=4)  # 5 seconds
    frames = decode_video(path, fps=1)
    assert len(frames) == 5 and frames[0].size == (32, 32)
    brightness = [np.asarray(f).mean() for f in frames]
    assert brightness == sorted(brightness)  # in order: frames 0, 4, 8, 12, 16
    assert len(decode_video(path, fps=2)) == 10
    assert len(decode_video(path, fps=1, max_frames=3)) == 3


def test_frame_folder_and_errors(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for index in range(6):
        Image.new("RGB", (8, 8), (index, 0, 0)).save(folder / f"{index:03d}.png")
    assert [f.getpixel((0, 0))[0] for f in decode_video(folder)] == list(range(6))
    assert len(decode_video(folder, max_frames=3)) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VideoError, match="frame folder has no images"):
        decode_video(empty)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(VideoError, match="broken.mp4: cannot decode video"):
        decode_video(broken)


def test_uniform_sampling():
    assert sample_indices(10, 1, None) == list(range(10))
    assert sample_indices(100, 1, 5) == [0, 25, 50, 74, 99]


def test_a_rate_above_the_videos_repeats_frames_to_keep_the_count(tmp_path):
    """--video_fps above the video's own rate, as LLaVA-NeXT-Video / LLaMA-VID style samplers do: every sampled
    time keeps a frame (the one on screen then), so the count is duration x fps, capped by --max_frames,
    and never silently fewer."""
    assert sample_indices(4, 0.5, None) == [0, 0, 1, 1, 2, 2, 3, 3]  # 2 frames per source frame
    assert len(sample_indices(12, 0.5, 16)) == 16  # 24 wanted, capped at 16, spread over the 12 frames
    assert sample_indices(3, 1, 5) == [0, 1, 2]  # max_frames is a cap: a short clip at its own rate stays short
    path = tmp_path / "clip.mp4"
    write_video(path, frames=12, rate=4)  # 3 seconds
    frames = decode_video(path, fps=8)
    assert len(frames) == 24
    brightness = [np.asarray(f).mean() for f in frames]
    assert brightness[0::2] == brightness[1::2]  # each source frame twice, in order
    assert len(decode_video(path, fps=8, max_frames=16)) == 16
