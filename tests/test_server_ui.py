"""The chat page at ``/`` in headless Chromium (Debian's ``chromium`` package), driven over the DevTools
protocol as a user would: pick an image, ask, wait for the streamed answer, take a screenshot."""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import shutil
import subprocess
import time

import httpx
import openai
import pytest

from serve_support import free_port, image_message, png_data_url, running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Chromium for the chat page test: apt-get install -y chromium (Debian's package)")
ANSWER_TIMEOUT_S = 90


class DevTools:
    """The few DevTools protocol calls the test needs, over one page's websocket."""

    def __init__(self, socket):
        self.socket = socket
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        number = next(self.ids)
        self.socket.send(json.dumps({"id": number, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == number:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


def test_the_chat_page_streams_an_answer_with_the_cache_it_came_from(voco_dir, tmp_path, digit_images):
    image_file = tmp_path / "digit.png"
    digit_images[9].save(image_file)
    key = "ui-test-key"  # given through the environment here, typed into the page's options below
    with running_server(voco_dir, tmp_path, env={"LLAVA_VOCO_API_KEY": key}) as server:
        port = free_port()
        browser = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--remote-debugging-port={port}", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=900,800",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with contextlib.ExitStack() as stack:
            stack.callback(lambda: (browser.terminate(), browser.wait(timeout=30)))
            deadline = time.monotonic() + 60
            page = None
            while page is None:
                assert time.monotonic() < deadline, "Chromium did not open its DevTools port"
                try:
                    targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                    page = next((target for target in targets if target.get("type") == "page"), None)
                except httpx.HTTPError:
                    time.sleep(0.3)
            from websockets.sync.client import connect

            socket = stack.enter_context(connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30))
            tools = DevTools(socket)
            tools.call("Page.enable")
            tools.call("Page.navigate", url=server.base_url + "/")
            while tools.evaluate("document.readyState") != "complete" or tools.evaluate("!!document.getElementById('ask')") is not True:
                assert time.monotonic() < deadline, "the chat page did not load"
                time.sleep(0.2)
            # pick the image as the file chooser would, then ask
            document = tools.call("DOM.getDocument")["root"]["nodeId"]
            chooser = tools.call("DOM.querySelector", nodeId=document, selector="#image")["nodeId"]
            tools.call("DOM.setFileInputFiles", nodeId=chooser, files=[str(image_file)])
            while not tools.evaluate("!document.getElementById('preview').hidden"):
                assert time.monotonic() < deadline, "the picked image was never shown"
                time.sleep(0.1)
            tools.evaluate(f"document.getElementById('key').value = '{key}'; "
                           "document.getElementById('question').value = 'What is in the image?'; "
                           "document.getElementById('maxTokens').value = '8'; "
                           "document.getElementById('ask').click()")
            deadline = time.monotonic() + ANSWER_TIMEOUT_S
            while tools.evaluate("document.getElementById('answer').dataset.done") != "true":
                assert time.monotonic() < deadline, tools.evaluate("document.getElementById('status').textContent")
                time.sleep(0.2)
            shown = tools.evaluate("document.getElementById('answer').textContent")
            cache_line = tools.evaluate("document.getElementById('cache').textContent")
            screenshot = base64.b64decode(tools.call("Page.captureScreenshot", format="png")["data"])
        (tmp_path / "chat-page.png").write_bytes(screenshot)

        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0, timeout=60)
        expected = client.chat.completions.create(
            model=voco_dir.name, max_tokens=8,
            messages=image_message(png_data_url(digit_images[9]), "What is in the image?")).choices[0].message.content
    assert shown == expected and shown
    assert "compression ratio 16" in cache_line and "cached positions" in cache_line
    from PIL import Image

    with Image.open(io.BytesIO(screenshot)) as shot:
        assert shot.width == 900 and shot.height > 400
        # the answer is drawn: the screenshot is not one flat colour
        darkest, lightest = shot.convert("L").getextrema()
        assert lightest - darkest > 100
