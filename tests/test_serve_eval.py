"""The chat CLI and the eval entry, run as a user runs them (subprocesses, piped stdin, real files)."""

import json
import os
import subprocess
import sys
from pathlib import Path


from llava_voco.conversation import GPT, HUMAN, get_template
from llava_voco.inference import ImageChat, first_human_turn, prompt_for_reply

from conftest import load_voco

REPO = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def run(module, *args, stdin=None):
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], input=stdin, capture_output=True,
                            text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_prompt_for_reply_matches_llava_v1():
    template = get_template("v1")
    prompt = prompt_for_reply(template, [(HUMAN, first_human_turn("What is the sum?", 1))], 1)
    assert prompt == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is the sum? ASSISTANT:"
    )
    two_turns = [(HUMAN, first_human_turn("What is the sum?", 1)), (GPT, "7"), (HUMAN, "And the largest?")]
    assert prompt_for_reply(template, two_turns, 1).endswith("ASSISTANT: 7</s>USER: And the largest? ASSISTANT:")


def test_chat_turns_equal_full_conversation(voco_dir, digit_images):
    """Two turns answered from the cache give what greedy decoding over the whole conversation gives."""
    model, processor = load_voco(voco_dir)
    template = get_template("v1")
    chat = ImageChat(model, processor, template, [digit_images[2]], generation_kwargs={"max_new_tokens": 5, "do_sample": False})
    answers = [chat.ask("What is the sum?"), chat.ask("Which digit is at the top left?")]
    turns = [(HUMAN, first_human_turn("What is the sum?", 1)), (GPT, answers[0]), (HUMAN, "Which digit is at the top left?")]
    full = processor(images=digit_images[2], text=prompt_for_reply(template, turns, 1), return_tensors="pt")
    expected = model.generate(**full, max_new_tokens=5, do_sample=False)[0, full["input_ids"].shape[1]:]
    assert answers[1] == processor.tokenizer.decode(expected, skip_special_tokens=True).strip()


def test_cli_two_questions_one_compression(voco_dir, digit_images, tmp_path):
    image = tmp_path / "digit.png"
    digit_images[4].save(image)
    args = ["--model-path", voco_dir, "--image-file", image, "--temperature", "0", "--max-new-tokens", "6"]
    out = run("llava_voco.serve.cli", *args, stdin="What is the sum?\nWhich digit is at the top left?\n\n")
    assert "[compressed 1 image(s)] cached positions: 34 (without compression: 50); 16 vision tokens -> 1 VoCo token(s), compression ratio 16x" in out
    assert out.count("ASSISTANT: ") == 2 and "exit..." in out
    assert "[session: 2 turn(s), 1 vision tower pass(es)]" in out

    store = tmp_path / "store"
    first = run("llava_voco.serve.cli", *args, "--cache-dir", store, stdin="What is the sum?\n")
    second = run("llava_voco.serve.cli", *args, "--cache-dir", store, stdin="What is the sum?\n")
    assert "[compressed 1 image(s)]" in first and "1 vision tower pass(es)" in first
    assert "[loaded from the cache store 1 image(s)]" in second and "0 vision tower pass(es)" in second
    answer = lambda text: text.split("ASSISTANT: ")[1].split("\n")[0]
    assert answer(first) == answer(second) == answer(out)


def test_eval_one_compression_per_image_and_resume(voco_dir, digit_images, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for index in (0, 1):
        digit_images[index].save(images / f"{index}.png")
    questions = [
        {"question_id": f"q{i}", "image": f"{i % 2}.png", "text": text}
        for i, text in enumerate(["What is the sum?", "Which digit is at the top left?", "What is the largest digit?",
                                  "How many digits?", "Describe the picture.", "Which digit is this?"])
    ]
    question_file = tmp_path / "questions.jsonl"
    question_file.write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers_file = tmp_path / "answers" / "model.jsonl"
    args = ["--model-path", voco_dir, "--question-file", question_file, "--image-folder", images,
            "--answers-file", answers_file, "--batch-size", "2", "--max-new-tokens", "5"]
    out = run("llava_voco.eval.model_vqa", *args)
    assert "answered 6 question(s) (0 already" in out and "2 distinct image(s)/video(s), 2 vision tower pass(es)" in out
    lines = answers_file.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["question_id"] for r in records] == ["q0", "q2", "q4", "q1", "q3", "q5"]
    assert all(set(r) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} for r in records)
    assert records[0]["prompt"].endswith("USER: <image>\nWhat is the sum? ASSISTANT:")

    # answers from the cache equal full-sequence greedy decoding of the same prompt, in a batch of one image's
    # questions and in one that holds two images' (q4 and q1)
    model, processor = load_voco(voco_dir)
    for record in records:
        question = next(q for q in questions if q["question_id"] == record["question_id"])
        full = processor(images=digit_images[int(question["image"][0])], text=record["prompt"], return_tensors="pt")
        expected = model.generate(**full, max_new_tokens=5, do_sample=False)[0, full["input_ids"].shape[1]:]
        assert record["text"] == processor.tokenizer.decode(expected, skip_special_tokens=True).strip()

    # an interrupted run: two complete lines and half of the third
    answers_file.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][: len(lines[2]) // 2])
    out = run("llava_voco.eval.model_vqa", *args)
    assert "answered 4 question(s) (2 already" in out
    resumed = [json.loads(line) for line in answers_file.read_text().splitlines()]
    assert sorted(r["question_id"] for r in resumed) == sorted(q["question_id"] for q in questions)
    by_id = {r["question_id"]: r["text"] for r in records}
    assert all(by_id[r["question_id"]] == r["text"] for r in resumed)


def test_cli_and_eval_take_a_video(voco_dir, tmp_path):
    from test_video import write_video

    write_video(tmp_path / "clip.mp4", frames=12, rate=4)  # 3 frames at 1 fps
    out = run("llava_voco.serve.cli", "--model-path", voco_dir, "--video-file", tmp_path / "clip.mp4",
              "--temperature", "0", "--max-new-tokens", "4", stdin="What is the sum?\n")
    assert "[video: 3 frames, 17 tokens per frame]" in out  # 16 image tokens + 1 VoCo token
    assert "[compressed 0 image(s) and a 3-frame video]" in out and "48 vision tokens -> 3 VoCo token(s)" in out
    assert "1 vision tower pass(es)" in out  # the frames go through the tower as one chunk
    same = run("llava_voco.serve.cli", "--model-path", voco_dir, "--image-file", tmp_path / "clip.mp4",
               "--temperature", "0", "--max-new-tokens", "4", stdin="What is the sum?\n")
    answer = lambda text: text.split("ASSISTANT: ")[1].split("\n")[0]
    assert answer(same) == answer(out)

    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "video": "clip.mp4", "text": t}) + "\n"
                                 for i, t in enumerate(["What is the sum?", "Which digit is in frame 2?"])))
    answers = tmp_path / "a.jsonl"
    report = run("llava_voco.eval.model_vqa", "--model-path", voco_dir, "--question-file", questions,
                 "--image-folder", tmp_path, "--answers-file", answers, "--max-new-tokens", "4")
    assert "1 distinct image(s)/video(s), 1 vision tower pass(es)" in report
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question_id"] for r in records] == [0, 1] and "<video>" in records[0]["prompt"]
    assert records[0]["text"] == answer(out)
