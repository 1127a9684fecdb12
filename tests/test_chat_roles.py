"""The chat CLI names the speakers as the conversation template does (``--conv-mode``), not always
USER / ASSISTANT."""

import io
import sys

from llava_voco.conversation import TEMPLATES
from llava_voco.inference import role_names
from llava_voco.serve import cli


def test_role_names_of_every_template():
    names = {version: role_names(template) for version, template in TEMPLATES.items()}
    assert names["v1"] == names["llava_v1"] == names["llama_2"] == ("USER", "ASSISTANT")
    assert names["mpt"] == names["chatml_direct"] == names["llama_3"] == ("user", "assistant")
    assert all(user and assistant and "<|" not in user + assistant for user, assistant in names.values())


def test_cli_prompts_with_the_templates_roles(voco_dir, digit_images, tmp_path, capsys, monkeypatch):
    image = tmp_path / "digit.png"
    digit_images[0].save(image)
    for version, user, assistant in (("llama_3", "user", "assistant"), ("mpt", "user", "assistant"),
                                     ("v1", "USER", "ASSISTANT")):
        monkeypatch.setattr(sys, "stdin", io.StringIO("What is the sum?\n\n"))
        cli.main(["--model-path", str(voco_dir), "--image-file", str(image), "--conv-mode", version,
                  "--temperature", "0", "--max-new-tokens", "2"])
        out = capsys.readouterr().out
        assert out.count(f"{user}: ") == 2 and out.count(f"{assistant}: ") == 1, (version, out)
        if version != "v1":
            assert "USER" not in out and "ASSISTANT" not in out and "<|im_start|>" not in out, out
