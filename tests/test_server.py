"""The OpenAI-compatible server, through the official ``openai`` client and raw HTTP, on a subprocess."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import openai
import pytest

from serve_support import image_message, png_data_url, running_server

API_KEY = "test-key-123"
QUESTIONS = ["What is in the image?", "Which digit is at the top left?", "What is the sum of the digits?"]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def server(voco_dir, tmp_path_factory, digit_images):
    folder = tmp_path_factory.mktemp("served_images")
    digit_images[0].save(folder / "digit0.png")
    store = tmp_path_factory.mktemp("store")
    with running_server(voco_dir, folder.parent, "--api-key", API_KEY, "--image-root", str(folder),
                        "--cache-dir", f"file://{store}", "--max-batch", "8", "--max-body-bytes", "200000") as running:
        running.image_root, running.store = folder, store
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline_answers(voco_dir, digit_images):
    """Greedy answers of the offline path (``ImageChat``, as the eval entry answers), per (image, question)."""
    from llava_voco.conversation import get_template
    from llava_voco.inference import ImageChat, load_model

    model, processor = load_model(str(voco_dir))
    answers = {}
    for index in (0, 1, 2):
        chat = ImageChat(model, processor, get_template("v1"), [digit_images[index]],
                         generation_kwargs={"max_new_tokens": MAX_TOKENS, "do_sample": False})
        for question in QUESTIONS:
            answers[index, question] = chat.ask(question, keep_turn=False)
    return answers


def _model_name(client) -> str:
    return client.models.list().data[0].id


def test_answers_equal_offline_greedy_streamed_or_not_with_compressed_usage(client, server, digit_images,
                                                                          offline_answers):
    model = _model_name(client)
    url = png_data_url(digit_images[1])
    before = server.metrics()
    reply = client.chat.completions.create(model=model, messages=image_message(url, QUESTIONS[0]),
                                           max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].message.content == offline_answers[1, QUESTIONS[0]]
    assert reply.choices[0].finish_reason in ("stop", "length")
    usage = reply.usage
    # the model holds the prompt without the image's 16 vision tokens (its VoCo token stays)
    assert usage.model_extra["uncompressed_prompt_tokens"] - usage.prompt_tokens == 16
    assert 1 <= usage.completion_tokens <= MAX_TOKENS
    assert reply.model_extra["voco"]["compression_ratio"] == 16.0

    chunks = list(client.chat.completions.create(model=model, messages=image_message(url, QUESTIONS[0]),
                                                 max_tokens=MAX_TOKENS, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == reply.choices[0].message.content
    assert len([chunk for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]) > 1  # streamed
    assert chunks[-1].usage.prompt_tokens == usage.prompt_tokens
    after = server.metrics()
    assert after["voco_compressions_total"] - before["voco_compressions_total"] == 1  # once for both requests
    assert after['voco_requests_total{status="200"}'] - before.get('voco_requests_total{status="200"}', 0) == 2


def test_concurrent_requests_for_one_new_image_share_one_compression_and_match_offline(server, client, digit_images,
                                                                                      offline_answers):
    model = _model_name(client)
    url = png_data_url(digit_images[2])
    before = server.metrics()
    answers, errors = {}, []

    def ask(slot: int) -> None:
        question = QUESTIONS[slot % len(QUESTIONS)]
        try:
            reply = client.chat.completions.create(model=model, messages=image_message(url, question),
                                                   max_tokens=MAX_TOKENS)
            answers[slot] = (question, reply.choices[0].message.content)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=ask, args=(slot,)) for slot in range(9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(answers) == 9
    for question, answer in answers.values():
        assert answer == offline_answers[2, question]
    after = server.metrics()
    assert after["voco_compressions_total"] - before["voco_compressions_total"] == 1
    assert after["voco_batch_size_sum"] > before["voco_batch_size_sum"]


def test_a_local_path_under_image_root_is_the_same_image_as_its_bytes(server, client, digit_images, offline_answers):
    model = _model_name(client)
    reply = client.chat.completions.create(model=model, max_tokens=MAX_TOKENS,
                                           messages=image_message(str(server.image_root / "digit0.png"), QUESTIONS[1]))
    assert reply.choices[0].message.content == offline_answers[0, QUESTIONS[1]]


def test_multi_turn_history_and_sampling_with_a_seed_repeat(client):
    model = _model_name(client)
    from PIL import Image

    url = png_data_url(Image.new("RGB", (16, 16), (200, 30, 30)))
    messages = image_message(url, QUESTIONS[0]) + [
        {"role": "assistant", "content": "A handwritten digit."},
        {"role": "user", "content": "What is the largest digit?"},
    ]
    first = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0.9, top_p=0.9,
                                           seed=7)
    again = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0.9, top_p=0.9,
                                           seed=7)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.usage.prompt_tokens > 0


def test_a_stop_string_ends_the_answer_before_it(client, digit_images, offline_answers):
    model = _model_name(client)
    full = offline_answers[1, QUESTIONS[0]]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    reply = client.chat.completions.create(model=model, max_tokens=MAX_TOKENS, stop=[stop],
                                           messages=image_message(png_data_url(digit_images[1]), QUESTIONS[0]))
    assert reply.choices[0].message.content == full[: full.index(stop)].strip()
    assert reply.choices[0].finish_reason == "stop"


def test_without_the_api_key_every_v1_request_is_refused_in_openai_format(server):
    bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        bad.models.list()
    assert raised.value.status_code == 401
    response = httpx.post(server.base_url + "/v1/chat/completions", json={"model": "x", "messages": []})
    assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
    assert httpx.get(server.base_url + "/health").status_code == 200  # outside /v1


def _post(server, body, raw: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server.base_url + "/v1/chat/completions", content=content, headers=headers, timeout=60)


def test_bad_input_is_a_4xx_in_openai_format_naming_the_problem_and_the_server_keeps_serving(
        server, client, digit_images, tmp_path):
    model = _model_name(client)
    good = png_data_url(digit_images[3])
    outside = tmp_path / "secret.png"
    digit_images[3].save(outside)
    not_an_image = "data:image/png;base64," + base64.b64encode(b"hello, not a png").decode()
    too_many = [{"type": "image_url", "image_url": {"url": good}}] * 70 + [{"type": "text", "text": "Count them."}]

    def ask(content, **extra):
        return {"model": model, "messages": [{"role": "user", "content": content}], **extra}

    def with_image(url):
        return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]

    cases = [
        (None, b'{"model": "x", "messages": [', 400, "malformed JSON"),
        (ask(with_image(not_an_image)), None, 400, "not an image"),
        (ask(with_image("data:image/png;base64,@@@not base64@@@")), None, 400, "corrupt base64"),
        (ask(with_image("data:image/png;base64," + "A" * 300_000)), None, 413, "limit"),
        (ask(with_image("https://example.com/cat.png")), None, 400, "--allow-remote-images"),
        (ask(with_image(str(outside))), None, 400, "outside --image-root"),
        (ask(with_image(good), max_tokens=5000), None, 400, "max_tokens 5000"),
        ({**ask(with_image(good)), "model": "gpt-4o"}, None, 404, "gpt-4o"),
        (ask(too_many), None, 400, "positions"),
        (ask([{"type": "image_url", "image_url": {}}, {"type": "text", "text": "?"}]), None, 400, "no url"),
        ({"model": model}, None, 400, "messages"),
    ]
    for body, raw, status, naming in cases:
        response = _post(server, body, raw)
        assert response.status_code == status, (naming, response.text)
        error = response.json()["error"]
        assert naming in error["message"], (naming, error)
        assert error["type"] == "invalid_request_error"
    # the openai client raises its typed errors on them
    with pytest.raises(openai.BadRequestError, match="--allow-remote-images"):
        client.chat.completions.create(model=model, messages=image_message("http://example.com/a.png", "?"))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=image_message(good, "?"))
    # and it keeps serving
    reply = client.chat.completions.create(model=model, messages=image_message(good, "What is it?"), max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_models_health_metrics_and_the_chat_page(server, client):
    assert [entry.id for entry in client.models.list().data] == [_model_name(client)]
    health = httpx.get(server.base_url + "/health").json()
    assert health["status"] == "ok" and health["mode"] == "voco"
    metrics = server.metrics()
    for name in ("voco_compressions_total", "voco_tokens_generated_total", "voco_batch_size_count",
                 "voco_time_to_first_token_seconds_count"):
        assert name in metrics
    assert any(name.startswith("voco_cache_hits_total") for name in metrics)
    page = httpx.get(server.base_url + "/").text
    assert "/v1/chat/completions" in page and "compression ratio" in page


def test_a_client_that_hangs_up_stops_its_decoding(server, client, digit_images):
    """A stream closed after its first chunk leaves the batch at the next step instead of decoding on."""
    model = _model_name(client)
    url = png_data_url(digit_images[4])
    full = client.chat.completions.create(model=model, messages=image_message(url, QUESTIONS[0]), max_tokens=300)
    assert full.choices[0].finish_reason == "length"  # left alone, this answer takes all 300 tokens
    before = server.metrics()
    stream = client.chat.completions.create(model=model, messages=image_message(url, QUESTIONS[0]),
                                            max_tokens=300, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 60
    while server.metrics().get("voco_requests_cancelled_total", 0) == before.get("voco_requests_cancelled_total", 0):
        assert time.monotonic() < deadline, "the hung-up request was never dropped"
        time.sleep(0.2)
    after = server.metrics()
    assert after["voco_tokens_generated_total"] - before["voco_tokens_generated_total"] < 300


def test_a_second_process_on_the_same_store_compresses_nothing(server, client, voco_dir, tmp_path, digit_images):
    url = png_data_url(digit_images[5])
    first = client.chat.completions.create(model=_model_name(client), max_tokens=MAX_TOKENS,
                                           messages=image_message(url, QUESTIONS[0]))
    with running_server(voco_dir, tmp_path, "--cache-dir", f"file://{server.store}") as second:
        other = openai.OpenAI(base_url=second.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
        reply = other.chat.completions.create(model=_model_name(other), max_tokens=MAX_TOKENS,
                                              messages=image_message(url, QUESTIONS[0]))
        metrics = second.metrics()
    assert reply.choices[0].message.content == first.choices[0].message.content
    assert metrics["voco_compressions_total"] == 0 and metrics['voco_cache_hits_total{source="store"}'] == 1


def test_video_as_frames_and_as_a_video_data_url(server, client, digit_images):
    av = pytest.importorskip("av")
    import numpy as np

    model = _model_name(client)
    frames = [png_data_url(image) for image in digit_images[6:9]]
    before = server.metrics()
    as_frames = client.chat.completions.create(model=model, max_tokens=6, messages=[{"role": "user", "content": [
        {"type": "video", "video": frames}, {"type": "text", "text": "Which digit is in frame 3?"}]}])
    # each of the 3 frames' 16 vision tokens is dropped (compressed frame by frame into 1 VoCo token each)
    assert as_frames.usage.model_extra["uncompressed_prompt_tokens"] - as_frames.usage.prompt_tokens == 3 * 16

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=1)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for image in digit_images[6:9]:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    video_url = "data:video/mp4;base64," + base64.b64encode(buffer.getvalue()).decode()
    as_video = client.chat.completions.create(model=model, max_tokens=6, messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": video_url}}, {"type": "text", "text": "Which digit is in frame 3?"}]}])
    assert as_video.usage.model_extra["uncompressed_prompt_tokens"] - as_video.usage.prompt_tokens == 3 * 16
    assert server.metrics()["voco_compressions_total"] - before["voco_compressions_total"] == 2
