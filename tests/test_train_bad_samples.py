"""Bad samples through the training entry: refused before the first step in one line, or one line when one
still fails mid-run (a sample drawn unchecked), never a traceback."""

from __future__ import annotations

import json

from llava_voco.train.train import cli

from test_train import WORDS, common_args, layout_a, tiny  # noqa: F401


def image_samples(count: int, images: int) -> list[dict]:
    return [{"id": f"digit-{n}", "image": f"digits/{n % images}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": WORDS[n % 10]}]}
        for n in range(count)]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]


def test_a_corrupt_image_is_refused_before_the_first_step(tiny, tmp_path, capsys):
    """A LLaVA-flag run whose sample 70 of 81 has a corrupt image: one line naming it and --skip_bad_samples,
    before any step (no checkpoint written)."""
    (tiny.image_folder / "digits" / "corrupt.png").write_bytes(b"not an image, garbage " * 20)
    samples = image_samples(81, images=48)
    samples[70]["image"] = "digits/corrupt.png"
    data_path = tmp_path / "data.json"
    data_path.write_text(json.dumps(samples))
    output_dir = tmp_path / "out"
    argv = layout_a(tiny) + ["--voco_tokens", "1", "--lazy_preprocess", "True"] + common_args(
        tiny, output_dir, data_path=data_path, max_steps=20, save_steps=5)
    assert cli([str(a) for a in argv]) == 1
    errors = error_lines(capsys.readouterr().err)
    assert errors == [
        f"llava-voco-train: error: {data_path}: 1 of 81 samples cannot be used: sample id 'digit-70' (index 70): "
        f"unreadable image file {tiny.image_folder}/digits/corrupt.png: not an image file PIL can read (corrupt, or "
        "another kind of file) (fix or remove them, or pass --skip_bad_samples True to train without them)"], errors
    assert not list(output_dir.glob("checkpoint-*")) and not (output_dir / "model.safetensors").exists()


def test_a_sample_that_fails_mid_run_is_one_line(tiny, tmp_path, capsys):
    """Unchecked (--check_samples False), in a DataLoader worker: the error names the sample in one line,
    not torch's "Caught DataError in DataLoader worker process 0" and the worker's traceback."""
    whole = (tiny.image_folder / "digits" / "0.png").read_bytes()
    (tiny.image_folder / "digits" / "cut.png").write_bytes(whole[: len(whole) // 2])  # its header is sound
    samples = image_samples(8, images=48)
    samples[5]["image"] = "digits/cut.png"
    data_path = tmp_path / "data.json"
    data_path.write_text(json.dumps(samples))
    argv = layout_a(tiny) + ["--voco_tokens", "1", "--check_samples", "False"] + common_args(
        tiny, tmp_path / "out", data_path=data_path, num_train_epochs=1, save_strategy="no",
        dataloader_num_workers=1)
    assert cli([str(a) for a in argv]) == 1
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith(
        f"llava-voco-train: error: {data_path}: sample id 'digit-5' (index 5): unreadable image file "
        f"{tiny.image_folder}/digits/cut.png: unreadable image file: "), errors
