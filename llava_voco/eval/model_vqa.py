"""Answer a LLaVA question file, compressing each distinct image once.

    python -m llava_voco.eval.model_vqa --model-path DIR --question-file q.jsonl --image-folder DIR
        --answers-file a.jsonl [--conv-mode v1] [--batch-size 8] [--temperature 0] [--max-new-tokens 128]

Reads LLaVA's question JSONL (``question_id``, ``image`` or ``video``, ``text``) and writes LLaVA's answers JSONL
(``question_id``, ``prompt``, ``text``, ``answer_id``, ``model_id``, ``metadata``), one line per answer,
flushed as it goes. Rerunning with the same answers file resumes: answered questions are skipped and a
half-written last line (an interrupted run) is dropped first.
"""

from __future__ import annotations

import argparse
import json
import os
import uuid
from collections import OrderedDict
from pathlib import Path

from tqdm import tqdm

from ..conversation import get_template
from ..inference import ImageChat, count_vision_passes, load_images, load_model
from ..video import load_video


def read_questions(path: str) -> list[dict]:
    questions = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                question = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON line: {error}") from error
            missing = [key for key in ("question_id", "text") if key not in question]
            if missing:
                raise ValueError(f"{path}:{number}: question without {', '.join(missing)}")
            questions.append(question)
    return questions


def answered_ids(path: str) -> set:
    """Question ids already answered; rewrites the file without a half-written last line."""
    if not os.path.exists(path):
        return set()
    complete, ids = [], set()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # interrupted mid-write
            if line.endswith("\n"):
                complete.append(line)
                ids.add(record["question_id"])
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(complete)
    return ids


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None, help="accepted for LLaVA compatibility: must be empty")
    parser.add_argument("--question-file", required=True)
    parser.add_argument("--image-folder", required=True)
    parser.add_argument("--answers-file", required=True)
    parser.add_argument("--conv-mode", default="v1")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--device", default=None)
    parser.add_argument("--video-folder", default=None, help="where questions' 'video' paths are (default: --image-folder)")
    parser.add_argument("--video-fps", type=float, default=1.0)
    parser.add_argument("--max-frames", type=int, default=None)
    args = parser.parse_args(argv)
    if args.model_base:
        raise SystemExit("--model-base (LoRA weights over a base model) is not supported: merge the LoRA first")

    template = get_template(args.conv_mode)
    model, processor = load_model(args.model_path, device=args.device)
    model_id = Path(args.model_path).name
    generation = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        generation["temperature"] = args.temperature

    questions = read_questions(args.question_file)
    Path(args.answers_file).parent.mkdir(parents=True, exist_ok=True)
    done = answered_ids(args.answers_file)
    pending = [q for q in questions if q["question_id"] not in done]
    by_image: OrderedDict[tuple[str, str], list[dict]] = OrderedDict()
    for question in pending:  # an image, a video (file, frame folder or .safetensors features), or neither
        media = ("video", question["video"]) if question.get("video") else ("image", question.get("image") or "")
        by_image.setdefault(media, []).append(question)

    with count_vision_passes(model) as vision, open(args.answers_file, "a", encoding="utf-8") as out, tqdm(
        total=len(pending), desc="answering", unit="q"
    ) as progress:
        for (kind, name), image_questions in by_image.items():
            images, video = [], None
            if kind == "video":
                # a file, a folder of frames, or precomputed frame features (.safetensors)
                video = load_video(os.path.join(args.video_folder or args.image_folder, name), fps=args.video_fps,
                                   max_frames=args.max_frames, width=model.config.vision_config.hidden_size)
            elif name:
                images = load_images([os.path.join(args.image_folder, name)])
            chat = ImageChat(model, processor, template, images, generation_kwargs=generation, video=video)
            for start in range(0, len(image_questions), args.batch_size):
                batch = image_questions[start : start + args.batch_size]
                for question, (prompt, answer) in zip(batch, chat.ask_batch([q["text"] for q in batch])):
                    record = {
                        "question_id": question["question_id"],
                        "prompt": prompt,
                        "text": answer,
                        "answer_id": uuid.uuid4().hex,
                        "model_id": model_id,
                        "metadata": {},
                    }
                    out.write(json.dumps(record) + "\n")
                out.flush()
                progress.update(len(batch))
    print(
        f"answered {len(pending)} question(s) ({len(done)} already in {args.answers_file}); "
        f"{len(by_image)} distinct image(s)/video(s), {vision['passes']} vision tower pass(es)"
    )


if __name__ == "__main__":
    main()
