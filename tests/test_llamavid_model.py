"""LLaMA-VID inside the LLaVA model: tokens per image and frame, text guidance end to end, gradients from
the LM loss, save/load, and VoCo on top of LLaMA-VID tokens."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, LlavaConfig

import llava_voco
from llava_voco import VoCoLlavaConfig, VoCoLlavaForConditionalGeneration, VoCoLlavaProcessor
from llava_voco.model.projectors.llamavid import encode_instructions
from llava_voco.demo.tiny import train_wordpiece_tokenizer

QFORMER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
           "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


@pytest.fixture(scope="module")
def bert():
    return train_wordpiece_tokenizer()


def llamavid(llava_dir, bert, voco_dir=None, **overrides):
    base = LlavaConfig.from_pretrained(voco_dir or llava_dir).to_dict()
    base.pop("model_type")
    fields = dict(mm_projector_type="llamavid", llamavid_num_query=4, llamavid_compress_type="grid:2",
                  llamavid_video_compress_type="mean", llamavid_qformer={**QFORMER, "vocab_size": len(bert)})
    config = VoCoLlavaConfig(**{**base, **fields, **overrides})
    torch.manual_seed(0)
    model = VoCoLlavaForConditionalGeneration(config).eval()
    processor = VoCoLlavaProcessor.from_pretrained(
        voco_dir or llava_dir, llamavid_compress_type="grid:2", llamavid_video_compress_type="mean",
        voco_tokens=overrides.get("voco_tokens", 0),
    )
    return model, processor


def test_tokens_per_image_and_per_frame(llava_dir, bert, digit_images):
    model, processor = llamavid(llava_dir, bert)
    batch = processor(images=[digit_images[0]], videos=[digit_images[1:4]], text="USER: <image> and <video> sum?",
                      return_tensors="pt")
    image_id = model.config.image_token_id
    assert int((batch["input_ids"] == image_id).sum()) == (1 + 4) + 3 * (1 + 1)  # grid:2 image, mean frames
    assert batch["video_frame_mask"].tolist() == [False, True, True, True]
    instructions = encode_instructions(bert, ["what is the sum of the digits"] * 4)
    with torch.no_grad():
        features = model.model.encode_images(batch["pixel_values"], **instructions,
                                                       video_frame_mask=batch["video_frame_mask"])
        logits = model(**batch, **instructions).logits
    assert [f.shape[0] for f in features] == [5, 2, 2, 2]
    assert torch.isfinite(logits).all()


def test_context_token_follows_the_instruction(llava_dir, bert, digit_images):
    model, processor = llamavid(llava_dir, bert)
    batch = processor(images=[digit_images[0]] * 2, text=["USER: <image> What?"] * 2, return_tensors="pt")
    instructions = encode_instructions(bert, ["which digit is at the top left", "how many times does seven appear"])
    with torch.no_grad():
        features = model.model.encode_images(batch["pixel_values"], **instructions)
        logits = model(**batch, **instructions).logits
    # at initialisation the queries are small, so the difference is small, but it is well above float
    # noise (the content tokens, which do not read the instruction, agree to 1e-6)
    assert (features[0][0] - features[1][0]).abs().max() > 1e-6  # context tokens differ
    torch.testing.assert_close(features[0][1:], features[1][1:], atol=1e-6, rtol=0)  # content: same up to float noise
    assert (logits[0, -1] - logits[1, -1]).abs().max() > 1e-7


def test_lm_loss_trains_the_text_decoder_and_projections(llava_dir, bert, digit_images):
    model, processor = llamavid(llava_dir, bert)
    model.train()
    batch = processor(images=[digit_images[0]], text="USER: <image> What is the sum? ASSISTANT: 7", return_tensors="pt")
    loss = model(**batch, **encode_instructions(bert, ["what is the sum"]), labels=batch["input_ids"]).loss
    loss.backward()
    projector = model.model.multi_modal_projector
    for name in ("query_tokens", "query_projection.weight", "key_projection.weight", "context_projection.weight",
                 "content_projector.linear_1.weight"):
        assert projector.get_parameter(name).grad.abs().sum() > 0, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.text_decoder.parameters())


def test_save_load_and_missing_instructions(llava_dir, bert, digit_images, tmp_path):
    model, processor = llamavid(llava_dir, bert)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert reloaded.config.mm_projector_type == "llamavid" and reloaded.config.llamavid_qformer["hidden_size"] == 32
    batch = processor(images=[digit_images[2]], text="USER: <image> What?", return_tensors="pt")
    instructions = encode_instructions(bert, ["describe the picture"])
    with torch.no_grad():
        # equal but for the last bits (1.8e-7 measured) since the text decoder reads LayerNorm'd features: a weight
        # lost in saving would move them by far more
        torch.testing.assert_close(model(**batch, **instructions).logits, reloaded(**batch, **instructions).logits,
                                   rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="needs instruction_input_ids"):
        model(**batch)


def test_voco_on_llamavid_tokens(voco_dir, llava_dir, bert, digit_images):
    voco_id = VoCoLlavaConfig.from_pretrained(voco_dir).voco_token_id
    model, processor = llamavid(llava_dir, bert, voco_dir=voco_dir, voco_tokens=1, voco_token_id=voco_id)
    model.set_attn_implementation("eager")
    batch = processor(images=[digit_images[0]], videos=[digit_images[1:3]], text="USER: <image><video> sum? ASSISTANT:",
                      return_tensors="pt")
    ids = batch["input_ids"][0]
    image = (ids == model.config.image_token_id).nonzero().squeeze(1)
    voco = (ids == voco_id).nonzero().squeeze(1)
    assert len(image) == 5 + 2 + 2 and len(voco) == 3
    with torch.no_grad():
        out = model(**batch, **encode_instructions(bert, ["sum"] * 3), output_attentions=True)
    text_rows = torch.arange(int(voco.max()) + 1, len(ids))
    for layer in out.attentions:
        assert torch.all(layer[0][:, text_rows][:, :, image] == 0)
        assert torch.all(layer[0][:, text_rows][:, :, voco] > 0)


def test_processor_encodes_instructions_and_saves_the_text_decoder_tokenizer(llava_dir, bert, digit_images, tmp_path):
    model, processor = llamavid(llava_dir, bert)
    processor.text_decoder_tokenizer = bert
    processor.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    reloaded = llava_voco.VoCoLlavaProcessor.from_pretrained(tmp_path)
    assert reloaded.text_decoder_tokenizer is not None and reloaded.llamavid_compress_type == "grid:2"
    batch = reloaded(images=[digit_images[0]], videos=[digit_images[1:3]], text="USER: <image> and <video>",
                     instructions=["which digit is at the top left", "what is the sum of the digits"],
                     return_tensors="pt")
    assert batch["instruction_input_ids"].shape[0] == 3  # the image, then each frame of the video
    decoded = bert.batch_decode(batch["instruction_input_ids"], skip_special_tokens=True)
    assert decoded == ["which digit is at the top left", "what is the sum of the digits", "what is the sum of the digits"]
    with torch.no_grad():
        assert torch.isfinite(AutoModelForImageTextToText.from_pretrained(tmp_path)(**batch).logits).all()
    default = reloaded(images=[digit_images[0]], text="USER: <image>\nWhat is the sum?", return_tensors="pt")
    # without instructions=, the turn that shows the image (issue 24: it was the whole text, "user : what ...")
    assert bert.decode(default["instruction_input_ids"][0], skip_special_tokens=True) == "what is the sum?"


def test_chat_and_eval_path_with_llamavid(llava_dir, bert, digit_images):
    """The serve/eval path passes the question as each image's instruction."""
    from llava_voco.conversation import get_template
    from llava_voco.inference import ImageChat

    model, processor = llamavid(llava_dir, bert)
    processor.text_decoder_tokenizer = bert
    chat = ImageChat(model, processor, get_template("v1"), [digit_images[0]],
                     generation_kwargs={"max_new_tokens": 3, "do_sample": False})
    assert not chat.uses_voco
    single = chat.ask("what is the sum of the digits", keep_turn=False)
    batched = chat.ask_batch(["what is the sum of the digits", "which digit is at the top left"])
    assert batched[0][1] == single


def test_extract_video_features_script(llava_dir, bert, tmp_path):
    """Features written by the script, read back a chunk at a time, give the tokens the pixels give."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from llava_voco.model.projectors.llamavid import FrameFeatures
    from llava_voco.video import decode_video
    from test_video import write_video

    model, processor = llamavid(llava_dir, bert)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "clip.mp4", frames=12, rate=4)  # 3 frames at 1 fps
    script = Path(__file__).parents[1] / "scripts" / "extract_video_features.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, str(script), "--model-path", str(tmp_path / "model"), "--video-folder", str(videos),
               "--output-folder", str(tmp_path / "features")]
    assert "wrote 1 feature file(s)" in subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    assert "1 already there" in subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout

    stored = FrameFeatures(tmp_path / "features" / "clip.safetensors")
    assert stored.shape == (3, 16, model.config.vision_config.hidden_size)
    frames = decode_video(videos / "clip.mp4", fps=1)
    pixels = processor.image_processor(frames, return_tensors="pt")["pixel_values"]
    instructions = encode_instructions(bert, ["what is the sum"] * 3)
    with torch.no_grad():
        from_pixels = model.model.encode_images(pixels, **instructions, video_frame_mask=torch.ones(3, dtype=torch.bool))
        from_file = model.model.multi_modal_projector(stored, instructions["instruction_input_ids"],
                                                      instructions["instruction_attention_mask"], "mean", frame_chunk=2)
    torch.testing.assert_close(from_file, torch.stack(from_pixels), atol=1e-5, rtol=1e-5)


def test_the_projector_runs_the_configs_frame_chunk(llava_dir, bert, digit_images):
    """``config.frame_chunk`` frames go through LLaMA-VID's text decoder at a time, given to the projector directly
    (a features file) or through the model (issue 24: the projector ran its own 64 whatever the config said)."""
    model, processor = llamavid(llava_dir, bert, frame_chunk=3)
    passes = []
    hook = model.model.multi_modal_projector.text_decoder.register_forward_hook(lambda *args: passes.append(1))
    frames = [digit_images[i % 10] for i in range(70)]
    pixels = processor.image_processor(frames, return_tensors="pt")["pixel_values"]
    instructions = encode_instructions(bert, ["what is the sum"] * 70)
    frame_mask = torch.ones(70, dtype=torch.bool)
    try:
        with torch.no_grad():
            features = model.model.vision_patch_features(pixels[:7])
            model.model.multi_modal_projector(features, instructions["instruction_input_ids"][:7],
                                              instructions["instruction_attention_mask"][:7], compress_type="mean")
            assert len(passes) == 3  # 7 frames, 3 at a time
            passes.clear()
            model.config.frame_chunk = 70  # one chunk of 70 frames: one pass, not 64 + 6
            chunked = model.model.encode_images(pixels, **instructions, video_frame_mask=frame_mask)
            assert len(passes) == 1
            model.config.frame_chunk = 3
            assert torch.allclose(torch.stack(model.model.encode_images(pixels, **instructions, video_frame_mask=frame_mask)),
                                  torch.stack(chunked), atol=1e-5)
    finally:
        hook.remove()
