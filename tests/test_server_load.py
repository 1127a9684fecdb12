"""The bounded load test: 64 concurrent clients x 4 questions over 16 images, loopback only."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import openai

from serve_support import image_message, running_server

CLIENTS, QUESTIONS_PER_CLIENT, IMAGES = 64, 4, 16
QUESTIONS = ["What is in the image?", "Which digit is at the top left?", "What is the sum of the digits?",
             "How many times does 7 appear?"]
MAX_TOKENS = 8
TIME_LIMIT_S = 300


def test_64_clients_x_4_questions_over_16_images(voco_dir, tmp_path, digit_images):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(IMAGES):
        digit_images[index].save(folder / f"digit{index}.png")
    # offline greedy answers: the eval entry, one question at a time
    from llava_voco.eval.model_vqa import main as model_vqa

    question_file, answers_file = tmp_path / "questions.jsonl", tmp_path / "answers.jsonl"
    with open(question_file, "w") as handle:
        for index in range(IMAGES):
            for number, question in enumerate(QUESTIONS):
                handle.write(json.dumps({"question_id": f"{index}-{number}", "image": f"digit{index}.png",
                                         "text": question}) + "\n")
    model_vqa(["--model-path", str(voco_dir), "--question-file", str(question_file), "--image-folder", str(folder),
               "--answers-file", str(answers_file), "--batch-size", "1", "--max-new-tokens", str(MAX_TOKENS)])
    offline = {}
    for line in answers_file.read_text().splitlines():
        record = json.loads(line)
        offline[record["question_id"]] = record["text"]
    assert len(offline) == IMAGES * len(QUESTIONS)

    urls = ["data:image/png;base64," + base64.b64encode((folder / f"digit{index}.png").read_bytes()).decode()
            for index in range(IMAGES)]
    with running_server(voco_dir, tmp_path, "--max-batch", "32") as server:
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=120)

        async def session(number: int) -> list[tuple[str, str]]:
            image = number % IMAGES
            answers = []
            for turn in range(QUESTIONS_PER_CLIENT):
                question = (number // IMAGES + turn) % len(QUESTIONS)
                reply = await client.chat.completions.create(
                    model=voco_dir.name, max_tokens=MAX_TOKENS, temperature=0,
                    messages=image_message(urls[image], QUESTIONS[question]))
                answers.append((f"{image}-{question}", reply.choices[0].message.content))
            return answers

        async def everyone():
            return await asyncio.wait_for(
                asyncio.gather(*(session(number) for number in range(CLIENTS)), return_exceptions=True), TIME_LIMIT_S)

        started = time.monotonic()
        results = asyncio.run(everyone())
        elapsed = time.monotonic() - started
        metrics = server.metrics()
    errors = [result for result in results if isinstance(result, BaseException)]
    assert not errors, errors[:3]
    answers = [answer for result in results for answer in result]
    assert len(answers) == CLIENTS * QUESTIONS_PER_CLIENT
    wrong = [(key, answer, offline[key]) for key, answer in answers if answer != offline[key]]
    assert not wrong, wrong[:5]
    assert metrics["voco_compressions_total"] == IMAGES
    assert metrics['voco_cache_hits_total{source="memory"}'] == CLIENTS * QUESTIONS_PER_CLIENT - IMAGES
    assert metrics['voco_requests_total{status="200"}'] == CLIENTS * QUESTIONS_PER_CLIENT
    batch_mean = metrics["voco_batch_size_sum"] / metrics["voco_batch_size_count"]
    print(f"\nload test: {len(answers)} answers in {elapsed:.1f} s ({len(answers) / elapsed:.1f}/s), "
          f"{int(metrics['voco_compressions_total'])} compressions, mean decoding batch {batch_mean:.1f}, "
          f"TTFT mean {metrics['voco_time_to_first_token_seconds_sum'] / metrics['voco_time_to_first_token_seconds_count']:.3f} s")
