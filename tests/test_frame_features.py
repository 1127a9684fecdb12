"""Video frames given as precomputed features (a ``.safetensors`` file of ``[frames, patches, dim]``, what
``scripts/extract_video_features.py`` writes) in place of their pixels: through the processor, the model
(LLaMA-VID and the ordinary projectors, VoCo compression), the training data and the chat / eval path.

Features are extracted here with the model's own vision tower from the same frames, so the result must be
what the pixels give: tokens identical, tokens / logits / losses within FEATURE_ATOL (the same float ops
on the same numbers; the margin only allows another batch split of the vision tower and the projector).
"""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlavaConfig

from llava_voco import VoCoLlavaConfig, VoCoLlavaForConditionalGeneration, VoCoLlavaProcessor
from llava_voco.conversation import get_template
from llava_voco.model.projectors.llamavid import encode_instructions
from llava_voco.demo.tiny import train_wordpiece_tokenizer
from llava_voco.inference import ImageChat, count_vision_passes
from llava_voco.train.collator import pop_batch_stats
from llava_voco.train.data import DataArguments, DataError, make_supervised_data_module
from llava_voco.video import decode_video, load_video

from conftest import load_voco
from test_llamavid_model import llamavid
from test_serve_eval import run
from test_video import write_video

FEATURE_ATOL = 1e-5


@pytest.fixture(scope="module")
def bert():
    return train_wordpiece_tokenizer()


def extract(model, processor, frames, path):
    """What scripts/extract_video_features.py stores: the model's own vision tower on the processed frames."""
    pixel_values = processor.image_processor(frames, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        save_file({"features": model.model.vision_patch_features(pixel_values).contiguous()}, str(path))
    return path


def test_llamavid_features_file_gives_the_pixel_frames_tokens_logits_and_loss(llava_dir, bert, digit_images, tmp_path):
    model, processor = llamavid(llava_dir, bert)
    frames = digit_images[1:4]
    path = extract(model, processor, frames, tmp_path / "clip.safetensors")
    text = "USER: <image> and <video> what is the sum? ASSISTANT: 7"
    from_pixels = processor(images=[digit_images[0]], videos=[frames], text=text, return_tensors="pt")
    from_file = processor(images=[digit_images[0]], videos=[str(path)], text=text, return_tensors="pt")
    assert torch.equal(from_file["input_ids"], from_pixels["input_ids"])  # (1 + 4) for the image, 2 per frame
    assert from_file["pixel_values"].shape[0] == 1 and from_file["frame_features"].shape == (3, 16, 32)
    assert from_file["frame_features_mask"].tolist() == [False, True, True, True]
    assert from_file["video_frame_mask"].tolist() == from_pixels["video_frame_mask"].tolist()
    instructions = encode_instructions(bert, ["what is the sum"] * 4)
    with torch.no_grad(), count_vision_passes(model) as vision:
        tokens_from_file = model.model.encode_images(
            from_file["pixel_values"], frame_features=from_file["frame_features"],
            frame_features_mask=from_file["frame_features_mask"], video_frame_mask=from_file["video_frame_mask"],
            **instructions,
        )
        assert vision["passes"] == 1  # the image only: the frames skip the tower
        tokens_from_pixels = model.model.encode_images(
            from_pixels["pixel_values"], video_frame_mask=from_pixels["video_frame_mask"], **instructions
        )
        out_file = model(**from_file, **instructions, labels=from_file["input_ids"])
        out_pixels = model(**from_pixels, **instructions, labels=from_pixels["input_ids"])
        only_frames = processor(videos=[str(path)], text="USER: <video> sum?", return_tensors="pt")
        passes_before = vision["passes"]
        model(**only_frames, **encode_instructions(bert, ["sum"] * 3))
        assert vision["passes"] == passes_before and "pixel_values" not in only_frames
    assert [t.shape[0] for t in tokens_from_file] == [5, 2, 2, 2]
    for from_file_tokens, from_pixels_tokens in zip(tokens_from_file, tokens_from_pixels):
        torch.testing.assert_close(from_file_tokens, from_pixels_tokens, atol=FEATURE_ATOL, rtol=0)
    torch.testing.assert_close(out_file.logits, out_pixels.logits, atol=FEATURE_ATOL, rtol=0)
    torch.testing.assert_close(out_file.loss, out_pixels.loss, atol=FEATURE_ATOL, rtol=0)


def test_voco_k1_features_give_the_pixel_frames_logits_compression_and_answers(voco_dir, tmp_path):
    write_video(tmp_path / "clip.mp4", frames=12, rate=4)  # 3 frames at 1 fps
    frames = decode_video(tmp_path / "clip.mp4", fps=1)
    model, processor = load_voco(voco_dir, attn_implementation="eager")
    path = extract(model, processor, frames, tmp_path / "clip.safetensors")
    head_text, question = "A chat. USER: <video>", "\nWhat is the sum of the digits? ASSISTANT:"
    from_pixels = processor(videos=[frames], text=head_text + question, return_tensors="pt")
    from_file = processor(videos=[str(path)], text=head_text + question, return_tensors="pt")
    assert torch.equal(from_file["input_ids"], from_pixels["input_ids"])  # 16 image tokens + 1 VoCo per frame
    assert int((from_file["input_ids"] == model.config.voco_token_id).sum()) == 3
    with torch.no_grad():
        logits_file = model(**from_file).logits
        logits_pixels = model(**from_pixels).logits
    torch.testing.assert_close(logits_file, logits_pixels, atol=FEATURE_ATOL, rtol=0)

    # streaming compression, frame by frame, and answers from the cache
    with count_vision_passes(model) as vision:
        cache_file = model.compress(**processor(videos=[str(path)], text=head_text, return_tensors="pt"))
    assert vision["passes"] == 0
    cache_pixels = model.compress(**processor(videos=[frames], text=head_text, return_tensors="pt"))
    assert cache_file.get_seq_length() == cache_pixels.get_seq_length()
    for layer_file, layer_pixels in zip(cache_file.layers, cache_pixels.layers):
        torch.testing.assert_close(layer_file.keys, layer_pixels.keys, atol=FEATURE_ATOL, rtol=0)
        torch.testing.assert_close(layer_file.values, layer_pixels.values, atol=FEATURE_ATOL, rtol=0)
    question_ids = processor.tokenizer(question, add_special_tokens=False, return_tensors="pt")
    greedy = {"max_new_tokens": 4, "do_sample": False}
    assert torch.equal(model.generate(**question_ids, past_key_values=cache_file, **greedy),
                       model.generate(**question_ids, past_key_values=cache_pixels, **greedy))
    # plain generate: the frame features are read by the prefill only
    assert torch.equal(model.generate(**from_file, **greedy), model.generate(**from_pixels, **greedy))


@pytest.mark.parametrize("projector_type, pooling", [("linear", "none"), ("mlp2x_gelu", "grid:2")])
def test_ordinary_projectors_read_features_as_pixels(llava_dir, digit_images, tmp_path, projector_type, pooling):
    base = LlavaConfig.from_pretrained(llava_dir).to_dict()
    base.pop("model_type")
    torch.manual_seed(0)
    model = VoCoLlavaForConditionalGeneration(
        VoCoLlavaConfig(**base, mm_projector_type=projector_type, vision_token_pooling=pooling)
    ).eval()
    processor = VoCoLlavaProcessor.from_pretrained(llava_dir, vision_token_pooling=pooling)
    frames = digit_images[4:6]
    path = extract(model, processor, frames, tmp_path / "clip.safetensors")
    text = "USER: <video> then <image> what? ASSISTANT:"
    from_pixels = processor(videos=[frames], images=[digit_images[0]], text=text, return_tensors="pt")
    from_file = processor(videos=[str(path)], images=[digit_images[0]], text=text, return_tensors="pt")
    assert torch.equal(from_file["input_ids"], from_pixels["input_ids"])
    assert from_file["frame_features_mask"].tolist() == [True, True, False]
    with torch.no_grad():
        logits_file = model(**from_file).logits
        logits_pixels = model(**from_pixels).logits
    torch.testing.assert_close(logits_file, logits_pixels, atol=FEATURE_ATOL, rtol=0)


def write_data(tmp_path, samples):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(samples))
    return str(path)


def conversation(question, answer):
    return [{"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": answer}]


def test_training_sample_with_a_features_file(voco_dir, image_folder, tmp_path):
    """A features file samples --max_frames as a frame folder does; it collates beside image samples and the
    loss equals the pixel-frame sample's."""
    model, processor = load_voco(voco_dir)
    frames_dir = image_folder / "frames"
    frames_dir.mkdir()
    for n in range(5):
        (image_folder / f"digit{n}.png").rename(frames_dir / f"{n:03d}.png")
    all_frames = decode_video(frames_dir)
    extract(model, processor, all_frames, image_folder / "frames.safetensors")
    samples = [
        {"id": "pixels", "video": "frames", "conversations": conversation("What is the sum?", "12")},
        {"id": "features", "video": "frames.safetensors", "conversations": conversation("What is the sum?", "12")},
        {"id": "image", "image": "digit6.png", "conversations": [
            {"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "a digit"}]},
    ]
    args = DataArguments(data_path=write_data(tmp_path, samples), image_folder=str(image_folder), max_frames=3)
    module = make_supervised_data_module(processor, args, version="v1", model_max_length=512,
                                         vision_hidden_size=model.config.vision_config.hidden_size)
    dataset, collator = module["train_dataset"], module["data_collator"]
    pixels, features = dataset[0], dataset[1]
    assert pixels["pixel_values"].shape[0] == 3 and "pixel_values" not in features
    stored = load_video(image_folder / "frames.safetensors")
    assert torch.equal(features["frame_features"], stored[[0, 2, 4]])  # uniform, as the folder's frames 0, 2, 4
    assert torch.equal(features["input_ids"], pixels["input_ids"]) and torch.equal(features["labels"], pixels["labels"])
    assert features["num_voco_tokens"] == 3 and features["video_frame_mask"].tolist() == [True] * 3

    batch_features = collator([features, dataset[2]])
    batch_pixels = collator([pixels, dataset[2]])
    pop_batch_stats(batch_features), pop_batch_stats(batch_pixels)
    assert batch_features["frame_features_mask"].tolist() == [True, True, True, False]
    assert batch_features["pixel_values"].shape[0] == 1
    assert batch_features["video_frame_mask"].tolist() == [True] * 3 + [False]
    with torch.no_grad():
        loss_features = model(**batch_features).loss
        loss_pixels = model(**batch_pixels).loss
    torch.testing.assert_close(loss_features, loss_pixels, atol=FEATURE_ATOL, rtol=0)


def test_zero3_blank_image_row_beside_precomputed_frames(voco_dir, digit_images, tmp_path):
    """Under ZeRO-3 a batch without pixels gets a blank image row (every rank must run the vision tower); with
    precomputed frames only, the blank image is the batch's last image and the loss stays the batch's own."""
    from transformers import TrainingArguments

    from llava_voco.train.trainer import VoCoLlavaTrainer

    model, processor = load_voco(voco_dir)
    path = extract(model, processor, digit_images[:3], tmp_path / "clip.safetensors")
    batch = dict(processor(videos=[str(path)], text="USER: <video> sum? ASSISTANT: 12", return_tensors="pt"))
    batch["labels"] = batch["input_ids"].clone()
    trainer = VoCoLlavaTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[]),
                               processing_class=processor, blank_image_for_text_batches=True)
    with torch.no_grad(), count_vision_passes(model) as vision:
        loss_with_blank_row = trainer.compute_loss(model, dict(batch))
        assert vision["passes"] == 1
        loss = model(**batch).loss
    torch.testing.assert_close(loss_with_blank_row, loss, atol=FEATURE_ATOL, rtol=0)


def test_bad_features_files_name_the_sample_and_the_file(voco_dir, image_folder, tmp_path):
    model, processor = load_voco(voco_dir)
    width = model.config.vision_config.hidden_size
    bad = {
        "wide": (torch.zeros(3, 16, width + 1), "width 33, but the model's vision tower gives 32"),
        "flat": (torch.zeros(3, 16), "expected [frames, patches, dim]"),
        "empty": (torch.zeros(0, 16, width), "the frame features are empty"),
        "coarse": (torch.zeros(3, 9, width), "9 patches per frame, but this processor's 16x16 frames give 16"),
    }
    samples = []
    for name, (tensor, _) in bad.items():
        save_file({"features": tensor}, str(image_folder / f"{name}.safetensors"))
        samples.append({"id": name, "video": f"{name}.safetensors", "conversations": conversation("Sum?", "1")})
    data_path = write_data(tmp_path, samples)
    # Before training: each file's header and first frame, all four named in one error (three, then a count).
    with pytest.raises(DataError) as raised:
        make_supervised_data_module(processor, DataArguments(data_path=data_path, image_folder=str(image_folder)),
                                    version="v1", model_max_length=512, vision_hidden_size=width)
    message = str(raised.value)
    assert "4 of 4 samples cannot be used" in message and "; and 1 more" in message, message
    for name, (_, problem) in list(bad.items())[:3]:
        assert f"sample id {name!r}" in message and f"{name}.safetensors" in message and problem in message, message
    # Unchecked (--check_samples False): each when it is drawn.
    args = DataArguments(data_path=data_path, image_folder=str(image_folder), check_samples=False)
    dataset = make_supervised_data_module(processor, args, version="v1", model_max_length=512,
                                          vision_hidden_size=width)["train_dataset"]
    for index, (name, (_, problem)) in enumerate(bad.items()):
        with pytest.raises(DataError) as raised:
            dataset[index]
        message = str(raised.value)
        assert f"sample id {name!r}" in message and f"{name}.safetensors" in message and problem in message, message
    # the model refuses another width too (a caller that skipped the data checks)
    batch = processor(videos=[torch.zeros(2, 16, width)], text="USER: <video>", return_tensors="pt")
    batch["frame_features"] = torch.zeros(2, 16, width + 1)
    with pytest.raises(ValueError, match="extracted with another vision tower"):
        model(**batch)


def test_chat_and_eval_take_a_features_file(voco_dir, tmp_path):
    write_video(tmp_path / "clip.mp4", frames=12, rate=4)  # 3 frames at 1 fps
    script = run("scripts.extract_video_features", "--model-path", voco_dir, "--video-folder", tmp_path,
                 "--output-folder", tmp_path)
    assert "wrote 1 feature file(s)" in script
    model, processor = load_voco(voco_dir)
    chats = [ImageChat(model, processor, get_template("v1"), [], video=video,
                       generation_kwargs={"max_new_tokens": 4, "do_sample": False})
             for video in (load_video(tmp_path / "clip.safetensors"), decode_video(tmp_path / "clip.mp4"))]
    assert chats[0].uses_voco and chats[0].cache_summary() == chats[1].cache_summary()
    assert chats[0].ask("What is the sum?") == chats[1].ask("What is the sum?")

    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "video": video, "text": "What is the sum?"}) + "\n"
                                 for i, video in enumerate(["clip.mp4", "clip.safetensors"])))
    report = run("llava_voco.eval.model_vqa", "--model-path", voco_dir, "--question-file", questions,
                 "--image-folder", tmp_path, "--answers-file", tmp_path / "a.jsonl", "--max-new-tokens", "4")
    assert "2 distinct image(s)/video(s), 1 vision tower pass(es)" in report  # the features skip the tower
    answers = [json.loads(line)["text"] for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert answers[0] == answers[1]
