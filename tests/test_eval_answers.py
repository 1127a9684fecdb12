"""Resuming an answers file: only a half-written last line (an interrupted run) is dropped; any other bad
line is an error naming the file and the line, and the file is left as it was."""

import json

import pytest

from llava_voco.eval.model_vqa import answered_ids

RECORDS = [json.dumps({"question_id": f"q{i}", "text": str(i)}) for i in range(3)]


def test_a_half_written_last_line_is_dropped(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text(RECORDS[0] + "\n" + RECORDS[1] + "\n" + RECORDS[2][:12])
    assert answered_ids(str(path)) == {"q0", "q1"}
    assert path.read_text() == RECORDS[0] + "\n" + RECORDS[1] + "\n"
    assert answered_ids(str(path)) == {"q0", "q1"}  # a complete file is kept as it is


@pytest.mark.parametrize("bad_line, problem", [
    ('{"question_id": "q9", "te', "not a JSON line"),
    ('["not", "a", "record"]', "not an answer record"),
    ('{"text": "no id"}', "no question_id"),
])
def test_a_bad_line_before_the_last_is_an_error(tmp_path, bad_line, problem):
    path = tmp_path / "answers.jsonl"
    content = RECORDS[0] + "\n" + bad_line + "\n" + RECORDS[1] + "\n"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"^{path}:2: {problem}"):
        answered_ids(str(path))
    assert path.read_text() == content  # nothing dropped


def test_a_complete_but_unparsable_last_line_is_an_error(tmp_path):
    """A line that ends with a newline was written whole: if it does not parse, the file is damaged."""
    path = tmp_path / "answers.jsonl"
    path.write_text(RECORDS[0] + "\n" + "garbage\n")
    with pytest.raises(ValueError, match=f"^{path}:2: not a JSON line"):
        answered_ids(str(path))
