"""An OpenAI-compatible chat server where each image is compressed once for everyone.

    python -m llava_voco.serve.server --model-path DIR [--host 127.0.0.1] [--port 8000] [--cache-dir DIR|URL]
        [--max-batch 16] [--api-key KEY] [--allow-remote-images] [--image-root DIR]

``POST /v1/chat/completions`` (OpenAI's format, ``stream: true`` as server-sent events), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus) and a one-page chat UI at ``/``. Messages are rendered with
the checkpoint's own chat template; the text up to the last image is compressed once per distinct
(images, text, model) and kept in the ``VoCoCacheStore`` (``--cache-dir``: a folder or any fsspec URL
that several server processes share); requests are decoded together by ``scheduler.ServingEngine``.
A client's mistake is a 4xx in OpenAI's error format naming the problem; the server keeps serving.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import time
import uuid
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from ..conversation import ConversationError
from ..engine import GenerationOptions, ids_after_media
from .media import MediaError, MediaPolicy
from .metrics import ServerMetrics
from .scheduler import PreparedRequest

logger = logging.getLogger("llava_voco.serve")
API_KEY_ENV = "LLAVA_VOCO_API_KEY"


class APIError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------
# A request's body -> what the engine answers
# ---------------------------------------------------------------------------------------------------
class RequestReader:
    """Checks a chat request, reads its media under the policy and renders it with the engine (the
    checkpoint's own chat template)."""

    def __init__(self, serving, policy: MediaPolicy, model_name: str, default_max_tokens: int):
        from ..model.image_inputs import tokens_per_image

        self.serving, self.policy, self.model_name = serving, policy, model_name
        self.default_max_tokens = default_max_tokens
        self.engine = serving.engine
        self.tokenizer = self.engine.processor.tokenizer
        self.image_token_id = self.engine.processor.image_token_id
        self.image_positions = tokens_per_image(self.engine.processor).total
        self.frame_positions = tokens_per_image(self.engine.processor, is_frame=True).total

    def read(self, body) -> PreparedRequest:
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(400, "missing 'model'", param="model")
        if model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist (this server serves '{self.model_name}')",
                           param="model", code="model_not_found")
        if body.get("n", 1) != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        messages = self._messages(body.get("messages"))
        try:
            prompt = self.engine.render(messages)
        except ConversationError as error:
            raise APIError(400, f"messages: {error}", param="messages") from None
        placeholders = prompt.text.count(IMAGE_PLACEHOLDER) + prompt.text.count(VIDEO_PLACEHOLDER)
        media = len(prompt.images) + len(prompt.videos)
        if placeholders != media:
            raise APIError(400, f"the text holds {IMAGE_PLACEHOLDER} or {VIDEO_PLACEHOLDER} itself "
                                f"({placeholders} placeholders for {media} images/videos)", param="messages")
        text_ids = self.tokenizer(prompt.text.replace(VIDEO_PLACEHOLDER, IMAGE_PLACEHOLDER))["input_ids"]
        question_ids = ids_after_media(self.tokenizer, prompt.text, self.image_token_id) if media else list(text_ids)
        media_positions = (self.image_positions * len(prompt.images)
                           + sum(self.frame_positions * len(frames) for frames in prompt.videos))
        positions = len(text_ids) - media + media_positions
        room = self.serving.max_positions - positions
        if room <= 0:
            raise APIError(400, f"the prompt needs {positions} positions ({media} images/videos take "
                                f"{media_positions}), more than the model's {self.serving.max_positions}: "
                                "send fewer images or a shorter conversation", param="messages",
                           code="context_length_exceeded")
        return PreparedRequest(prompt=prompt, question_ids=question_ids, options=self._options(body, room),
                               uncompressed_prompt_tokens=positions)

    def _messages(self, messages) -> list[dict]:
        """OpenAI messages -> the engine's chat format, each image and video read under the policy."""
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list", param="messages")
        converted = []
        for number, message in enumerate(messages):
            where = f"messages[{number}]"
            if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
                raise APIError(400, f"{where}: a message needs a role of system, user or assistant", param=where)
            content = message.get("content")
            if isinstance(content, str):
                converted.append({"role": message["role"], "content": content})
                continue
            if not isinstance(content, list):
                raise APIError(400, f"{where}: content must be a string or a list of parts", param=where)
            parts = []
            for index, part in enumerate(content):
                what = f"{where}.content[{index}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" and message["role"] != "user":
                    raise APIError(400, f"{what}: images and videos go in user messages", param=what)
                try:
                    if kind == "text":
                        if not isinstance(part.get("text"), str):
                            raise APIError(400, f"{what}: a text part needs 'text'", param=what)
                        parts.append({"type": "text", "text": part["text"]})
                    elif kind == "image_url":
                        parts.append({"type": "image", "image": self.policy.read_image(_url_of(part, kind), what)})
                    elif kind == "video_url":
                        parts.append({"type": "video", "video": self.policy.read_video(_url_of(part, kind), what)})
                    elif kind == "video":
                        parts.append({"type": "video", "video": self.policy.read_frames(part.get("video"), what)})
                    else:
                        raise APIError(400, f"{what}: unknown part type {kind!r} (text, image_url, video_url or video)",
                                       param=what)
                except MediaError as error:
                    raise APIError(400, str(error), param=what, code="invalid_image") from None
            converted.append({"role": message["role"], "content": parts})
        if converted[-1]["role"] != "user":
            raise APIError(400, "the last message must be the user's", param="messages")
        return converted

    def _options(self, body: dict, room: int) -> GenerationOptions:
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens, room)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise APIError(400, "max_tokens must be a positive integer", param="max_tokens")
        if max_tokens > room:
            raise APIError(400, f"max_tokens {max_tokens} is more than the model's room after this prompt "
                                f"({room} of {self.serving.max_positions} positions)", param="max_tokens",
                           code="context_length_exceeded")
        temperature = body.get("temperature")
        temperature = 0.0 if temperature is None else temperature
        top_p = body.get("top_p")
        top_p = 1.0 if top_p is None else top_p
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise APIError(400, "temperature must be a number from 0 to 2", param="temperature")
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise APIError(400, "top_p must be a number in (0, 1]", param="top_p")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(item, str) and item for item in stop) or len(stop) > 4:
            raise APIError(400, "stop must be a string or a list of up to 4 non-empty strings", param="stop")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise APIError(400, "seed must be an integer", param="seed")
        return GenerationOptions(max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                                 seed=seed, stop=tuple(stop))


def _url_of(part: dict, kind: str):
    """The URL of an ``image_url`` / ``video_url`` part: ``{"url": ...}`` as OpenAI sends it, or a bare string."""
    value = part.get(kind)
    return value.get("url") if isinstance(value, dict) else value


# ---------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------
def create_app(engine, reader: RequestReader, metrics: ServerMetrics, api_key: str | None = None,
               max_body_bytes: int = 32 * 1024 * 1024):
    app = FastAPI(title="llava-voco", docs_url=None, redoc_url=None)
    started = time.time()

    def error_response(error: APIError) -> JSONResponse:
        metrics.request(error.status)
        return JSONResponse(error.body(), status_code=error.status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1"):
            if api_key is not None:
                given = request.headers.get("authorization", "")
                if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                    return error_response(APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                                                   code="invalid_api_key"))
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > max_body_bytes:
                return error_response(APIError(413, f"the request body is {length} bytes, more than the limit of "
                                                    f"{max_body_bytes}", code="request_too_large"))
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error):
        return error_response(APIError(400, "malformed request: " + "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', ()))}: {item.get('msg')}" for item in error.errors())))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": reader.model_name, "mode": engine.mode, "uptime_s": round(time.time() - started, 1)}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return resources.files("llava_voco.serve").joinpath("static/chat.html").read_text(encoding="utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": reader.model_name, "object": "model", "created": int(started),
                                            "owned_by": "llava-voco"}]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if name != reader.model_name:
            raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return {"id": name, "object": "model", "created": int(started), "owned_by": "llava-voco"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise APIError(413, f"the request body is more than the limit of {max_body_bytes} bytes",
                           code="request_too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise APIError(400, f"malformed JSON: {error}") from None
        prepared = await run_in_threadpool(reader.read, body)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        generation = engine.submit(prepared, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def usage() -> dict:
            cached = generation.cache_info.get("cached_positions", 0)
            return {"prompt_tokens": generation.prompt_tokens, "completion_tokens": len(generation.tokens),
                    "total_tokens": generation.prompt_tokens + len(generation.tokens),
                    "uncompressed_prompt_tokens": generation.uncompressed_prompt_tokens,
                    "prompt_tokens_details": {"cached_tokens": cached}}

        def voco_info() -> dict:
            info = dict(generation.cache_info)
            if info.get("voco_tokens"):
                info["compression_ratio"] = round(info["vision_tokens"] / info["voco_tokens"], 2)
            return info

        if not body.get("stream"):
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        generation.cancel()
                        return Response(status_code=499)
                    continue
                if event[0] == "error":
                    metrics.request(500)
                    return JSONResponse(APIError(500, event[1], kind="server_error").body(), status_code=500)
                if event[0] == "done":
                    break
            metrics.request(200)
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": reader.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": generation.text},
                                 "finish_reason": generation.finish_reason, "logprobs": None}],
                    "usage": usage(), "voco": voco_info()}

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict, finish_reason=None, **extra) -> str:
            data = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": reader.model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}
            return f"data: {json.dumps(data)}\n\n"

        async def stream():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    event = await events.get()
                    if event[0] == "delta":
                        yield chunk({"content": event[1]})
                    elif event[0] == "error":
                        metrics.request(500)
                        yield f"data: {json.dumps(APIError(500, event[1], kind='server_error').body())}\n\n"
                        break
                    else:
                        yield chunk({}, generation.finish_reason, voco=voco_info())
                        if include_usage:
                            data = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                    "model": reader.model_name, "choices": [], "usage": usage()}
                            yield f"data: {json.dumps(data)}\n\n"
                        metrics.request(200)
                        break
                yield "data: [DONE]\n\n"
            finally:  # a client that went away frees its slot at the next decoding step
                if generation.finish_reason is None:
                    generation.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


# ---------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Serve a VoCo LLaVA model behind OpenAI's Chat Completions API.")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--served-model-name", default=None, help="the model id clients send (default: the folder's name)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--cache-dir", default=None,
                        help="VoCoCacheStore root: a folder or an fsspec URL that several servers share")
    parser.add_argument("--cache-max-bytes", type=int, default=None, help="evict least recently used entries past this")
    parser.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    parser.add_argument("--hot-cache-entries", type=int, default=256, help="caches kept in memory")
    parser.add_argument("--mode", default=None, choices=("voco", "full-cache", "full"),
                        help="voco (default for VoCo checkpoints); full-cache / full serve a plain LLaVA with every "
                             "vision token, with or without a prefix cache (for comparison)")
    parser.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' on /v1 (or ${API_KEY_ENV})")
    parser.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    parser.add_argument("--image-root", default=None, help="read local image paths under this folder only")
    parser.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024)
    parser.add_argument("--max-media-bytes", type=int, default=20 * 1024 * 1024, help="per image or video")
    parser.add_argument("--max-pixels", type=int, default=4096 * 4096, help="decoded pixels per image or frame")
    parser.add_argument("--max-frames", type=int, default=16, help="frames per video")
    parser.add_argument("--video-fps", type=float, default=1.0)
    parser.add_argument("--default-max-tokens", type=int, default=256, help="when a request gives no max_tokens")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16")
    parser.add_argument("--attn-implementation", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's CPU threads (default: torch's choice); on a busy or small CPU, 1 avoids "
                             "threads waiting on each other over a tiny model's small matrices")
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def build(args):
    """(app, serving engine) from parsed arguments: the model loads once, its fingerprint is computed once."""
    from ..engine import InferenceEngine
    from .cache_store import VoCoCacheStore
    from .scheduler import ServingEngine

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    store = VoCoCacheStore(args.cache_dir, max_bytes=args.cache_max_bytes) if args.cache_dir else None
    # the serving engine keeps its own hot caches in front of the store; the engine's memory would repeat them
    engine = InferenceEngine.load(args.model_path, store=store, device=args.device, dtype=args.dtype,
                                  attn_implementation=args.attn_implementation, memory_cache_size=0)
    metrics = ServerMetrics()
    serving = ServingEngine(engine, mode=args.mode, max_batch=args.max_batch, hot_entries=args.hot_cache_entries,
                            metrics=metrics)
    policy = MediaPolicy(allow_remote=args.allow_remote_images, image_root=args.image_root,
                         max_media_bytes=args.max_media_bytes, max_pixels=args.max_pixels,
                         max_frames=args.max_frames, video_fps=args.video_fps)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model_path))
    reader = RequestReader(serving, policy, name, args.default_max_tokens)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(serving, reader, metrics, api_key=api_key, max_body_bytes=args.max_body_bytes)
    return app, serving


def main(argv=None) -> None:
    import uvicorn

    from ..errors import one_line_errors

    args = parse_args(argv)
    with one_line_errors():
        try:
            app, engine = build(args)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
    engine.start()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
