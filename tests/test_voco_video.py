"""VoCo on video: k VoCo tokens per frame, the mask per frame, streaming compression == full forward."""

import torch

from llava_voco.video import decode_video

from conftest import load_voco
from test_video import write_video

LOGIT_ATOL = 1e-5


def test_video_frames_each_get_voco_tokens_and_compress_in_a_stream(voco_dir, tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, frames=12, rate=4)  # 3 seconds -> 3 frames at 1 fps
    frames = [f.resize((16, 16)) for f in decode_video(path, fps=1)]
    assert len(frames) == 3
    model, processor = load_voco(voco_dir, attn_implementation="eager")
    head_text = "A chat. USER: <video>"
    question = "\nWhat is the sum of the digits in the frames? ASSISTANT:"
    full = processor(videos=[frames], text=head_text + question, return_tensors="pt")
    ids = full["input_ids"][0]
    image = (ids == model.config.image_token_id).nonzero().squeeze(1)
    voco = (ids == model.config.voco_token_id).nonzero().squeeze(1)
    assert len(voco) == 3 and full["pixel_values"].shape[0] == 3  # one VoCo token per frame
    per_frame = len(image) // 3
    assert all(int(voco[f]) == int(image[(f + 1) * per_frame - 1]) + 1 for f in range(3))

    with torch.no_grad():
        out = model(**full, output_attentions=True)
    text_rows = torch.arange(int(voco.max()) + 1, len(ids))
    for layer in out.attentions:
        assert torch.all(layer[0][:, text_rows][:, :, image] == 0)  # no frame's vision tokens
        assert torch.all(layer[0][:, text_rows][:, :, voco] > 0)
        later_frames = image[per_frame:]
        assert torch.all(layer[0][:, later_frames][:, :, image[:per_frame]] == 0)  # frame 2, 3 see frame 1 via VoCo

    head = processor(videos=[frames], text=head_text, return_tensors="pt")
    cache = model.compress(**head)
    assert cache.get_seq_length() == head["input_ids"].shape[1] - 3 * per_frame
    question_ids = processor.tokenizer(question, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        from_cache = model(**question_ids, past_key_values=cache).logits
    torch.testing.assert_close(from_cache, out.logits[:, head["input_ids"].shape[1]:], atol=LOGIT_ATOL, rtol=0)
