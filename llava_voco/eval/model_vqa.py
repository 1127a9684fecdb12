"""Answer a LLaVA question file, compressing each distinct image once.

    python -m llava_voco.eval.model_vqa --model-path DIR --question-file q.jsonl --image-folder DIR
        --answers-file a.jsonl [--conv-mode v1] [--batch-size 8] [--temperature 0] [--max-new-tokens 128]

Reads LLaVA's question JSONL (``question_id``, ``image`` or ``video``, ``text``) and writes LLaVA's answers JSONL
(``question_id``, ``prompt``, ``text``, ``answer_id``, ``model_id``, ``metadata``), one line per answer,
flushed as it goes. Rerunning with the same answers file resumes: answered questions are skipped and a
half-written last line (an interrupted run) is dropped first; any other bad line stops the run, naming it.
A user's mistake (a missing or unreadable file, a bad line) ends the run with one line on stderr.
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
from ..inference import ImageChat, InputError, count_vision_passes, load_images, load_model, one_line_errors, read_video


def _lines(path: str, what: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readlines()
    except OSError as error:
        raise InputError(f"{path}: cannot read the {what}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: the {what} is not UTF-8 text: {error.reason}") from None


def read_questions(path: str) -> list[dict]:
    questions = []
    for number, line in enumerate(_lines(path, "question file"), 1):
        if not line.strip():
            continue
        try:
            question = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{number}: not a JSON line: {error}") from None
        if not isinstance(question, dict):
            raise InputError(f"{path}:{number}: not a question record (a JSON object)")
        missing = [key for key in ("question_id", "text") if key not in question]
        if missing:
            raise InputError(f"{path}:{number}: question without {', '.join(missing)}")
        questions.append(question)
    return questions


def answered_ids(path: str) -> set:
    """Question ids already answered. A run writes each answer as one whole line, so only the last line can
    be cut short (the run was interrupted): it is dropped and the file rewritten without it. Any other
    line that is not an answer record means the file is damaged or not ours: an error naming the line,
    and the file is left as it is."""
    if not os.path.exists(path):
        return set()
    lines = _lines(path, "answers file")
    ids = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines) and not line.endswith("\n"):
                break  # interrupted mid-write
            raise InputError(f"{path}:{number}: not a JSON line ({error}); only a half-written last line is "
                             "dropped on resume") from None
        if not line.endswith("\n"):
            break  # a last line without its newline was cut short too: answer it again
        if not isinstance(record, dict):
            raise InputError(f"{path}:{number}: not an answer record (a JSON object)")
        if "question_id" not in record:
            raise InputError(f"{path}:{number}: no question_id in the answer record")
        ids.add(record["question_id"])
    else:
        return ids
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(lines[:-1])
    return ids


def main(argv=None) -> None:
    with one_line_errors():
        _main(argv)


def _main(argv=None) -> None:
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
    parser.add_argument("--attn-implementation", default=None,
                        help="sdpa, eager, flex_attention, varlen_reference, varlen_torch or flash_attention_2 "
                             "(default: the checkpoint's)")
    parser.add_argument("--voco-tokens", type=int, default=None,
                        help="an elastic model's VoCo count per image, one of those it was trained with "
                             "(default: its largest)")
    parser.add_argument("--video-folder", default=None, help="where questions' 'video' paths are (default: --image-folder)")
    parser.add_argument("--video-fps", type=float, default=1.0)
    parser.add_argument("--max-frames", type=int, default=None)
    args = parser.parse_args(argv)
    if args.model_base:
        raise SystemExit("--model-base (LoRA weights over a base model) is not supported: merge the LoRA first")

    template = get_template(args.conv_mode)
    questions = read_questions(args.question_file)  # the files first: a mistake there costs no model load
    try:
        Path(args.answers_file).parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{args.answers_file}: cannot create its folder: {error.strerror or error}") from None
    done = answered_ids(args.answers_file)
    pending = [q for q in questions if q["question_id"] not in done]
    by_image: OrderedDict[tuple[str, str], list[dict]] = OrderedDict()
    for question in pending:  # an image, a video (file, frame folder or .safetensors features), or neither
        media = ("video", question["video"]) if question.get("video") else ("image", question.get("image") or "")
        by_image.setdefault(media, []).append(question)
    for (kind, name), image_questions in by_image.items():  # a missing file is found before the model loads
        path = os.path.join((args.video_folder or args.image_folder) if kind == "video" else args.image_folder, name)
        if name and not os.path.exists(path):
            raise InputError(f"{path}: no such {kind} file (question {image_questions[0]['question_id']!r} of "
                             f"{args.question_file})")
    model, processor = load_model(args.model_path, device=args.device,
                                  attn_implementation=args.attn_implementation, voco_tokens=args.voco_tokens)
    model_id = Path(args.model_path).name
    generation = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        generation["temperature"] = args.temperature

    with count_vision_passes(model) as vision, open(args.answers_file, "a", encoding="utf-8") as out, tqdm(
        total=len(pending), desc="answering", unit="q"
    ) as progress:
        for (kind, name), image_questions in by_image.items():
            images, video = [], None
            if kind == "video":
                # a file, a folder of frames, or precomputed frame features (.safetensors)
                video = read_video(os.path.join(args.video_folder or args.image_folder, name), model, processor,
                                   fps=args.video_fps, max_frames=args.max_frames)
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
                        "metadata": {"voco_tokens": args.voco_tokens} if args.voco_tokens is not None else {},
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
