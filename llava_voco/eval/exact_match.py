"""Exact-match accuracy of an answers file against the reference answers in its question file.

    python -m llava_voco.eval.exact_match --question-file q.jsonl --answers-file a.jsonl

The question file is LLaVA's (``question_id``, ``text``, ...) with the reference ``answer`` and, optionally,
a ``category`` per question (DigitGrid writes both). An answer counts when it equals the reference after
stripping spaces and a final full stop. Every question must have exactly one answer: a missing or
unknown answer is an error, never a silent skip.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from .model_vqa import read_questions


def normalise(text: str) -> str:
    return text.strip().rstrip(".").strip()


def read_answers(path: str) -> dict:
    answers = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON line: {error}") from error
            if record["question_id"] in answers:
                raise ValueError(f"{path}:{number}: question {record['question_id']!r} answered twice")
            answers[record["question_id"]] = record["text"]
    return answers


def score_answers(questions: list[dict], answers: dict, question_file: str = "", answers_file: str = "") -> dict:
    """``{"overall": acc, "categories": {category: acc}, "counts": {category: n}, "questions": n}`` of
    ``answers`` (question id -> text) against the questions' reference ``answer``."""
    known = {q["question_id"] for q in questions}
    unknown = sorted(set(answers) - known, key=str)
    if unknown:
        raise ValueError(f"{answers_file}: answers to questions not in {question_file}: {unknown[:5]}")
    correct, total = defaultdict(int), defaultdict(int)
    for question in questions:
        if "answer" not in question:
            raise ValueError(f"{question_file}: question {question['question_id']!r} has no reference 'answer'")
        if question["question_id"] not in answers:
            raise ValueError(f"{answers_file}: no answer to question {question['question_id']!r} of {question_file}")
        category = question.get("category", "all")
        total[category] += 1
        correct[category] += normalise(answers[question["question_id"]]) == normalise(question["answer"])
    return {
        "overall": sum(correct.values()) / max(sum(total.values()), 1),
        "categories": {c: correct[c] / total[c] for c in sorted(total)},
        "counts": dict(sorted(total.items())),
        "questions": sum(total.values()),
    }


def score(question_file: str, answers_file: str) -> dict:
    """``score_answers`` of an answers file against its question file."""
    return score_answers(read_questions(question_file), read_answers(answers_file), question_file, answers_file)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question-file", required=True)
    parser.add_argument("--answers-file", required=True)
    args = parser.parse_args(argv)
    result = score(args.question_file, args.answers_file)
    for category, accuracy in result["categories"].items():
        print(f"{category:>10}: {100 * accuracy:6.2f}%  ({result['counts'][category]} questions)")
    print(f"{'overall':>10}: {100 * result['overall']:6.2f}%  ({result['questions']} questions)")
    return result


if __name__ == "__main__":
    main()
