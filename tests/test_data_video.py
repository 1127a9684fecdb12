"""Video samples in the training data: frames decoded, each with its VoCo tokens, exact labels; LLaMA-VID
instructions per image."""

import json

import torch

import llava_voco
from llava_voco.model.llamavid import encode_instructions
from llava_voco.fixtures import train_wordpiece_tokenizer
from llava_voco.train.collator import pop_batch_stats
from llava_voco.train.data import DataArguments, DataError, make_supervised_data_module

from conftest import load_voco
from test_video import write_video


def write_data(tmp_path, samples):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(samples))
    return str(path)


def test_video_samples_train(voco_dir, image_folder, tmp_path):
    write_video(image_folder / "clip.mp4", frames=12, rate=4)  # 3 frames at 1 fps
    frames_dir = image_folder / "frames"
    frames_dir.mkdir()
    for n in range(2):
        (image_folder / f"digit{n}.png").rename(frames_dir / f"{n:03d}.png")
    samples = [
        {"id": "v1", "video": "clip.mp4", "conversations": [
            {"from": "human", "value": "<video>\nWhat is the sum?"}, {"from": "gpt", "value": "12"}]},
        {"id": "v2", "video": "frames", "conversations": [  # <image> for a video, as LLaVA-style data writes it
            {"from": "human", "value": "<image>\nWhich digit is in frame 2?"}, {"from": "gpt", "value": "3"}]},
        {"id": "i1", "image": "digit2.png", "conversations": [
            {"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "a digit"}]},
    ]
    model, processor = load_voco(voco_dir)
    args = DataArguments(data_path=write_data(tmp_path, samples), image_folder=str(image_folder), is_multimodal=True)
    module = make_supervised_data_module(processor, args, version="v1", model_max_length=512)
    dataset, collator = module["train_dataset"], module["data_collator"]
    first = dataset[0]
    assert first["pixel_values"].shape[0] == 3 and first["num_voco_tokens"] == 3
    assert first["video_frame_mask"].tolist() == [True, True, True]
    labelled = first["input_ids"][first["labels"] != -100]
    assert processor.tokenizer.decode(labelled) == "12</s>"
    assert dataset[1]["pixel_values"].shape[0] == 2 and dataset[1]["num_voco_tokens"] == 2
    assert dataset.modality_lengths[0] > 0

    batch = collator([dataset[i] for i in range(3)])
    stats = pop_batch_stats(batch)
    assert batch["pixel_values"].shape[0] == 3 + 2 + 1
    assert batch["video_frame_mask"].tolist() == [True] * 5 + [False]
    assert stats["num_voco_tokens"] == 6
    loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_missing_or_broken_video_named(voco_dir, image_folder, tmp_path):
    (image_folder / "broken.mp4").write_bytes(b"not a video")
    samples = [{"id": "bad", "video": "broken.mp4", "conversations": [
        {"from": "human", "value": "<video>\nSum?"}, {"from": "gpt", "value": "1"}]}]
    _, processor = load_voco(voco_dir)
    args = DataArguments(data_path=write_data(tmp_path, samples), image_folder=str(image_folder))
    dataset = make_supervised_data_module(processor, args, version="v1", model_max_length=512)["train_dataset"]
    try:
        dataset[0]
    except DataError as error:
        assert "sample id 'bad'" in str(error) and "broken.mp4: cannot decode video" in str(error)
    else:
        raise AssertionError("a broken video must raise")


def test_llamavid_instructions_come_from_the_turn(llava_dir, image_folder, tmp_path):
    bert = train_wordpiece_tokenizer()
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(llava_dir, llamavid_compress_type="grid:2")
    processor.text_decoder_tokenizer = bert
    samples = [{"id": "q", "image": "digit0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is the sum of the digits?"}, {"from": "gpt", "value": "7"},
        {"from": "human", "value": "Which digit is at the top left?"}, {"from": "gpt", "value": "3"}]}]
    args = DataArguments(data_path=write_data(tmp_path, samples), image_folder=str(image_folder))
    module = make_supervised_data_module(processor, args, version="v1", model_max_length=512)
    item = module["train_dataset"][0]
    assert bert.decode(item["instruction_input_ids"][0], skip_special_tokens=True) == "what is the sum of the digits?"
    assert int((item["input_ids"] == processor.image_token_id).sum()) == 1 + 4
    batch = module["data_collator"]([item, item])
    assert batch["instruction_input_ids"].shape[0] == 2
    assert torch.equal(batch["instruction_input_ids"][0], encode_instructions(bert, ["what is the sum of the digits?"])["instruction_input_ids"][0])
