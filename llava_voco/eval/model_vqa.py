"""Answer a LLaVA question file, compressing each distinct image once.

    python -m llava_voco.eval.model_vqa --model-path DIR --question-file q.jsonl --image-folder DIR
        --answers-file a.jsonl [--conv-mode NAME] [--batch-size 8] [--temperature 0] [--top_p P] [--num_beams N]
        [--max-new-tokens 128] [--num-chunks N --chunk-idx K] [--load-4bit | --load-8bit]

Reads LLaVA's question JSONL (``question_id``, ``image`` or ``video``, ``text``) and writes LLaVA's answers JSONL
(``question_id``, ``prompt``, ``text``, ``answer_id``, ``model_id``, ``metadata``), one line per answer,
flushed as it goes. Rerunning with the same answers file resumes: answered questions are skipped and a
half-written last line (an interrupted run) is dropped first; any other bad line stops the run, naming it.
A user's mistake (a missing or unreadable file, a bad line) ends the run with one line on stderr.

LLaVA's eval scripts run it unchanged: ``--num-chunks N --chunk-idx K`` answers the K-th of N shards of the
question file, cut as LLaVA's ``get_chunk`` cuts them (so ``cat`` of the N answers files is one run's
answers); ``--top_p``, ``--num_beams``; ``--load-4bit`` / ``--load-8bit`` through bitsandbytes. The prompt is
the template the checkpoint was trained with, unless ``--conv-mode`` names another.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import uuid
from collections import OrderedDict
from pathlib import Path

from tqdm import tqdm

from ..conversation import get_template
from ..engine import GenerationOptions, InferenceEngine, add_model_arguments, model_kwargs_from_args
from ..errors import InputError, one_line_errors
from ..image_io import ImageReadError, load_image
from ..inference import count_vision_passes, read_video
from ..video import VideoError


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
    if not questions:
        raise InputError(f"{path}: no questions (an empty question file)")
    return questions


def get_chunk(questions: list, num_chunks: int, chunk_index: int) -> list:
    """The ``chunk_index``-th of ``num_chunks`` shards, cut as LLaVA's ``get_chunk`` cuts them (chunks of
    ceil(n / num_chunks) questions in file order; the last ones may be short or empty)."""
    size = math.ceil(len(questions) / num_chunks)
    return questions[chunk_index * size : (chunk_index + 1) * size]


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
    add_model_arguments(parser)
    parser.add_argument("--model-base", default=None, help="accepted for LLaVA compatibility: must be empty")
    parser.add_argument("--question-file", required=True)
    parser.add_argument("--image-folder", required=True)
    parser.add_argument("--answers-file", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_p", "--top-p", type=float, default=None)
    parser.add_argument("--num_beams", "--num-beams", type=int, default=1)
    parser.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=128)
    parser.add_argument("--num-chunks", type=int, default=1, help="LLaVA's sharding: answer one of N shards")
    parser.add_argument("--chunk-idx", type=int, default=0, help="which shard (0 .. num-chunks - 1)")
    parser.add_argument("--video-folder", default=None, help="where questions' 'video' paths are (default: --image-folder)")
    parser.add_argument("--video-fps", type=float, default=1.0)
    parser.add_argument("--max-frames", type=int, default=None)
    args = parser.parse_args(argv)
    if args.model_base:
        raise SystemExit("--model-base (LoRA weights over a base model) is not supported: merge the LoRA first")
    if args.num_chunks < 1 or not 0 <= args.chunk_idx < args.num_chunks:
        raise InputError(f"--chunk-idx {args.chunk_idx} --num-chunks {args.num_chunks}: the index must be in "
                         f"0 .. num-chunks - 1")

    if args.conv_mode is not None:
        get_template(args.conv_mode)  # an unknown name is refused before anything loads
    questions = get_chunk(read_questions(args.question_file), args.num_chunks, args.chunk_idx)  # files first
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
    engine = InferenceEngine.load(args.model_path, conv_mode=args.conv_mode, memory_cache_size=1,
                                  **model_kwargs_from_args(args))
    model, processor = engine.model, engine.processor
    model_id = Path(args.model_path).name
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                num_beams=args.num_beams)
    metadata = {"voco_tokens": args.voco_tokens} if args.voco_tokens is not None else {}

    with count_vision_passes(model) as vision, open(args.answers_file, "a", encoding="utf-8") as out, tqdm(
        total=len(pending), desc="answering", unit="q"
    ) as progress:
        batch: list[tuple[dict, object]] = []  # (question, prompt): --batch-size questions, across images

        def answer_batch():
            for (question, prompt), answer in zip(batch, engine.answer([prompt for _, prompt in batch], options)):
                record = {
                    "question_id": question["question_id"],
                    "prompt": prompt.text,
                    "text": answer.text,
                    "answer_id": uuid.uuid4().hex,
                    "model_id": model_id,
                    "metadata": metadata,
                }
                out.write(json.dumps(record) + "\n")
            out.flush()
            progress.update(len(batch))
            batch.clear()

        # An image's questions are consecutive, so each image is read and compressed once (the engine keeps
        # the last compression); a batch may hold several images' questions, as one row each.
        for (kind, name), image_questions in by_image.items():
            path = os.path.join((args.video_folder or args.image_folder) if kind == "video" else args.image_folder, name)
            try:  # a file that does not open names the question that needs it
                if kind == "video":  # a file, a folder of frames, or precomputed frame features (.safetensors)
                    media = [{"type": "video", "video": read_video(path, model, processor, fps=args.video_fps,
                                                                   max_frames=args.max_frames)}]
                else:
                    media = [{"type": "image", "image": load_image(path)}] if name else []
            except (ImageReadError, VideoError) as error:
                if batch:  # the earlier images' questions are answered and kept, so a rerun resumes after them
                    answer_batch()
                raise InputError(f"{error} (question {image_questions[0]['question_id']!r} of "
                                 f"{args.question_file})") from None
            for question in image_questions:
                batch.append((question, engine.render(
                    [{"role": "user", "content": [*media, {"type": "text", "text": question["text"]}]}])))
                if len(batch) == args.batch_size:
                    answer_batch()
        if batch:
            answer_batch()
    print(
        f"answered {len(pending)} question(s) ({len(done)} already in {args.answers_file}); "
        f"{len(by_image)} distinct image(s)/video(s), {vision['passes']} vision tower pass(es)"
    )


if __name__ == "__main__":
    main()
