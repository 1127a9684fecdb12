"""Video samples in the training data: frames decoded, each with its VoCo tokens, exact labels; LLaMA-VID
instructions per image."""

import json

import pytest
import torch

import llava_voco
from llava_voco.constants import IGNORE_INDEX
from llava_voco.model.projectors.llamavid import encode_instructions
from llava_voco.demo.tiny import train_wordpiece_tokenizer
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
    labelled = first["input_ids"][first["labels"] != IGNORE_INDEX]
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
    data_path = write_data(tmp_path, samples)
    # Before training: the file does not open (its header).
    with pytest.raises(DataError) as raised:
        make_supervised_data_module(processor, DataArguments(data_path=data_path, image_folder=str(image_folder)),
                                    version="v1", model_max_length=512)
    assert "1 of 1 samples" in str(raised.value) and "sample id 'bad'" in str(raised.value)
    assert "broken.mp4: cannot decode video" in str(raised.value)
    # Unchecked (--check_samples False): when it is drawn.
    args = DataArguments(data_path=data_path, image_folder=str(image_folder), check_samples=False)
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


def test_llamavid_instructions_pad_with_the_text_decoder_pad_id(llava_dir, image_folder, tmp_path):
    """Instructions of different lengths in one batch are padded with the text decoder tokenizer's pad id (not
    with 0, another token in a tokenizer whose pad id is not 0): the batch holds what tokenizing them together
    gives."""
    bert = train_wordpiece_tokenizer()
    bert.pad_token = "[MASK]"  # a text decoder tokenizer whose pad id is not 0
    assert bert.pad_token_id != 0
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(llava_dir, llamavid_compress_type="grid:2")
    processor.text_decoder_tokenizer = bert
    questions = ["What is the sum of the digits?", "Which digit?"]
    samples = [{"id": f"q{n}", "image": "digit0.png", "conversations": [
        {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "7"}]}
        for n, question in enumerate(questions)]
    args = DataArguments(data_path=write_data(tmp_path, samples), image_folder=str(image_folder))
    module = make_supervised_data_module(processor, args, version="v1", model_max_length=512)
    batch = module["data_collator"]([module["train_dataset"][0], module["train_dataset"][1]])
    together = encode_instructions(bert, questions)
    assert batch["instruction_input_ids"].shape[1] > module["train_dataset"][1]["instruction_input_ids"].shape[1]
    assert torch.equal(batch["instruction_input_ids"], together["instruction_input_ids"])
    assert torch.equal(batch["instruction_attention_mask"], together["instruction_attention_mask"])


def test_llamavid_without_text_decoder_tokenizer_or_pad_is_refused(llava_dir, image_folder, tmp_path):
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(llava_dir, llamavid_compress_type="grid:2")
    samples = [{"id": "q", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "7"}]}]
    args = DataArguments(data_path=write_data(tmp_path, samples), image_folder=str(image_folder))
    with pytest.raises(ValueError, match="text_decoder_tokenizer"):
        make_supervised_data_module(processor, args, version="v1", model_max_length=512)
    processor.text_decoder_tokenizer = train_wordpiece_tokenizer()
    processor.text_decoder_tokenizer.pad_token = None
    with pytest.raises(ValueError, match="text decoder tokenizer has no pad token"):
        make_supervised_data_module(processor, args, version="v1", model_max_length=512)


def test_lengths_count_images_and_frames_as_the_model_does(llava_dir, image_folder, tmp_path):
    """--group_by_modality_length's estimate counts each image and each video frame with tokens_per_image:
    LLaMA-VID images (1 context + grid:2 content = 5) and frames (1 + mean = 2), VoCo tokens after each."""
    from llava_voco.model.image_inputs import tokens_per_image

    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(
        llava_dir, llamavid_compress_type="grid:2", llamavid_video_compress_type="mean")
    processor.text_decoder_tokenizer = train_wordpiece_tokenizer()
    samples = [
        {"id": "i", "image": "digit0.png", "conversations": [
            {"from": "human", "value": "<image>\nWhich digit?"}, {"from": "gpt", "value": "7"}]},
        {"id": "v", "video": "clip.mp4", "conversations": [  # not there: lengths need no file
            {"from": "human", "value": "<video>\nWhat is the sum?"}, {"from": "gpt", "value": "12"}]},
        {"id": "t", "conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "hello"}]},
    ]
    args = DataArguments(data_path=write_data(tmp_path, samples), image_folder=str(image_folder), max_frames=4,
                         check_samples=False)
    dataset = make_supervised_data_module(processor, args, version="v1", model_max_length=512)["train_dataset"]
    assert (tokens_per_image(processor).total, tokens_per_image(processor, is_frame=True).total) == (5, 2)
    assert dataset.lengths == [4 + 5, 6 + 4 * 2, 3]  # words (LLaVA counts "<image>" as one) + tokens
    assert dataset.modality_lengths == [4 + 5, 6 + 4 * 2, -3]
    item = dataset[0]
    assert item["num_vision_tokens"] + item["num_voco_tokens"] == 5  # the estimate of the image part is exact


def test_lengths_count_each_videos_own_frames(voco_dir, digit_images, tmp_path):
    """The length estimate reads how many frames each video gives, from its headers, sampled as loading samples
    them (issue 24: every video was estimated at --max_frames, or 8 without it, whatever its length)."""
    from llava_voco.model.image_inputs import tokens_per_image

    _, processor = load_voco(voco_dir)
    for name, count in (("short", 2), ("long", 12)):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(count):
            digit_images[i].save(folder / f"{i:03d}.png")
    write_video(tmp_path / "clip.mp4", frames=24, rate=4)  # 6 s: 6 frames at 1 fps, read from the container
    samples = [{"id": name, "video": name, "conversations": [
        {"from": "human", "value": "<video>\nWhat is the sum?"}, {"from": "gpt", "value": "12"}]}
        for name in ("short", "long", "clip.mp4")]
    per_frame = tokens_per_image(processor, is_frame=True).total
    words = 5  # "<video>", "What", "is", "the", "sum?" ... and the answer
    for max_frames, frames in ((None, (2, 12, 6)), (4, (2, 4, 4))):
        args = DataArguments(data_path=write_data(tmp_path, samples), image_folder=str(tmp_path), max_frames=max_frames)
        dataset = make_supervised_data_module(processor, args, version="v1", model_max_length=1024)["train_dataset"]
        assert dataset.lengths == [words + 1 + n * per_frame for n in frames]
        for index in (1, 2):  # what loading gives
            item = dataset[index]
            assert item["num_vision_tokens"] + item["num_voco_tokens"] == frames[index] * per_frame


@pytest.mark.parametrize("version", ["v1", "llava_llama_2", "chatml_direct", "llama_3"])
def test_the_processor_without_instructions_reads_the_turn_training_reads(llava_dir, image_folder, tmp_path, version):
    """Called on a rendered conversation without ``instructions=``, the processor gives LLaMA-VID's context token
    the human turn that shows the image, as the data pipeline does (issue 24: it gave the whole multi-turn text)."""
    from llava_voco.conversation import GPT, HUMAN, get_template
    from llava_voco.image_io import load_image

    bert = train_wordpiece_tokenizer()
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(llava_dir, llamavid_compress_type="grid:2")
    processor.text_decoder_tokenizer = bert
    conversations = [
        [(HUMAN, "<image>\nWhat is the sum of the digits?"), (GPT, "7"), (HUMAN, "Which digit is at the top left?"),
         (GPT, "3")],
        [(HUMAN, "Describe the digits."), (GPT, "four digits"), (HUMAN, "How many sevens are there?\n<image>"),
         (GPT, "2")],
    ]
    samples = [{"id": f"q{n}", "image": "digit0.png", "conversations": [{"from": role, "value": text} for role, text in turns]}
               for n, turns in enumerate(conversations)]
    args = DataArguments(data_path=write_data(tmp_path, samples), image_folder=str(image_folder))
    dataset = make_supervised_data_module(processor, args, version=version, model_max_length=512)["train_dataset"]
    image = load_image(image_folder / "digit0.png")
    for n, turns in enumerate(conversations):
        rendered = get_template(version).render(turns, num_images=1).text
        direct = processor(images=[image], text=rendered, return_tensors="pt")
        trained = dataset[n]["instruction_input_ids"]
        assert bert.batch_decode(direct["instruction_input_ids"], skip_special_tokens=True) == \
            bert.batch_decode(trained, skip_special_tokens=True)
        assert torch.equal(direct["instruction_input_ids"], trained)


@pytest.mark.parametrize("keep", [False, True])
def test_llamavid_instruction_newlines_deleted_as_llamavid_trains(llava_dir, image_folder, tmp_path, keep):
    """LLaMA-VID's training (``preprocess_imgsp_v1``) deletes a turn's newlines without a space before its text
    decoder reads it: two words across a line break become one; ``--keep_instruction_newlines`` keeps them."""
    bert = train_wordpiece_tokenizer()
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(llava_dir, llamavid_compress_type="grid:2")
    processor.text_decoder_tokenizer = bert
    samples = [{"id": "q", "image": "digit0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhich digit\nis at the top?"}, {"from": "gpt", "value": "7"}]}]
    args = DataArguments(data_path=write_data(tmp_path, samples), image_folder=str(image_folder),
                         keep_instruction_newlines=keep)
    item = make_supervised_data_module(processor, args, version="v1", model_max_length=512)["train_dataset"][0]
    expected = "Which digit\nis at the top?" if keep else "Which digitis at the top?"
    assert torch.equal(item["instruction_input_ids"][0], encode_instructions(bert, [expected])["instruction_input_ids"][0])
    assert keep or not torch.equal(item["instruction_input_ids"][0],
                                   encode_instructions(bert, ["Which digit is at the top?"])["instruction_input_ids"][0])


def test_llamavid_image_per_turn_as_imgsp_v1(llava_dir, image_folder, tmp_path):
    """``--image_per_turn`` (LLaMA-VID's ``imgsp_v1``): the image again in every later human turn, each copy's
    context token guided by its own turn."""
    bert = train_wordpiece_tokenizer()
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(llava_dir, llamavid_compress_type="grid:2")
    processor.text_decoder_tokenizer = bert
    turns = ["What is the sum of the digits?", "Which digit is at the top left?", "And at the bottom right?"]
    samples = [{"id": "q", "image": "digit0.png", "conversations": [
        {"from": "human", "value": "<image>\n" + turns[0]}, {"from": "gpt", "value": "7"},
        {"from": "human", "value": turns[1]}, {"from": "gpt", "value": "3"},
        {"from": "human", "value": turns[2]}, {"from": "gpt", "value": "1"}]}]
    data_path = write_data(tmp_path, samples)
    for per_turn, copies in ((False, 1), (True, 3)):
        args = DataArguments(data_path=data_path, image_folder=str(image_folder), image_per_turn=per_turn)
        item = make_supervised_data_module(processor, args, version="v1", model_max_length=1024)["train_dataset"][0]
        assert item["pixel_values"].shape[0] == copies
        assert int((item["input_ids"] == processor.image_token_id).sum()) == copies * (1 + 4)
        assert bert.batch_decode(item["instruction_input_ids"], skip_special_tokens=True) == \
            [turn.lower() for turn in turns[:copies]]
        labelled = item["input_ids"][item["labels"] != IGNORE_INDEX]
        assert processor.tokenizer.decode(labelled).replace(" ", "") == "7</s>3</s>1</s>"
