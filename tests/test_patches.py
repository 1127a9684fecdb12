"""patches/llava-v1.2.2: the VoCo patch series for an upstream LLaVA checkout (patches/README.md).

- the series applies in order (``git apply --check``, ``git am``; ``patch -p1``) to LLaVA v1.2.2's sources,
  taken from the ``llava-torch==1.2.2.post1`` wheel (identical to the v1.2.2 tag's ``llava/``);
- the generated patch carrying ``llava/model/voco_mask.py`` is not stale (scripts/make_patches.py);
- in a virtual environment with LLaVA's pinned stack (transformers 4.36.2 / tokenizers 0.15.0 beside the
  local torch; and transformers 4.37.2 on top), the patched LlavaLlamaForCausalLM gives the logits and loss of
  VoCoLlavaForConditionalGeneration for the same weights and inputs, eager and sdpa, both mask modes;
  its compress-once path gives the full forward's text logits and generate()'s tokens;
- LLaVA's own llava/train/train.py trains a few steps on CPU with ``--voco_tokens 1``, its loss falling, and its
  llava/eval/model_vqa.py answers from that checkpoint the same with and without ``--voco-cache``.

The wheel, the unpacked tree and the virtual environment are cached under ``.cache/patches/`` (git-ignored).
When the pinned stack cannot be installed (no package registry), those tests skip, naming the command and
its error; applying and staleness still run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "patches"
SERIES = ROOT / "patches" / "llava-v1.2.2"
SUPPORT = Path(__file__).resolve().parent / "patches_support"
WHEEL = "llava-torch==1.2.2.post1"
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")  # as the Makefile: the local CPU build here
# LLaVA v1.2.2's pins (pyproject.toml of the tag, and the wheel's metadata) for what its model and train code
# import; torch, numpy and sentencepiece as this machine has them (torch 2.0.1 and sentencepiece 0.1.99 have no
# wheel for this Python).
PINNED = [TORCH_SPEC, "numpy<2", "transformers==4.36.2", "tokenizers==0.15.0", "sentencepiece", "accelerate==0.21.0",
          "pillow", "safetensors", "protobuf", "shortuuid"]
# LLaVA's main branch after v1.2.2 moved to these; installed over the venv's (PYTHONPATH first).
OVERLAY_437 = ["transformers==4.37.2", "tokenizers==0.15.1"]
TOLERANCE = 1e-5
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "-c", "commit.gpgsign=false"]


def run(command, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)


def patches() -> list[Path]:
    found = sorted(SERIES.glob("*.patch"))
    assert found, f"no patches in {SERIES}"
    return found


# ------------------------------------------------------------------------------------------- the sources

def _publish(partial: Path, target: Path) -> None:
    """Move a finished cache entry into place; a concurrent run that finished first wins."""
    try:
        partial.rename(target)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)


@pytest.fixture(scope="session")
def llava_sources() -> Path:
    """LLaVA v1.2.2's ``llava/`` tree, unpacked from the PyPI wheel (cached)."""
    target = CACHE / "llava-v1.2.2"
    if (target / "llava" / "train" / "train.py").exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = list((CACHE / "wheel").glob("llava_torch-1.2.2.post1-*.whl"))
    if not wheels:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(CACHE / "wheel")]
        result = run(command, timeout=600)
        wheels = list((CACHE / "wheel").glob("llava_torch-1.2.2.post1-*.whl"))
        if result.returncode != 0 or not wheels:
            pytest.skip(f"cannot fetch LLaVA's sources: {' '.join(command)}: {result.stderr.strip()[-800:]}")
    partial = CACHE / f"llava-v1.2.2.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extractall(partial, members=[name for name in wheel.namelist() if name.startswith("llava/")])
    _publish(partial, target)
    return target


def git_tree(sources: Path, destination: Path) -> Path:
    """A git checkout of the pristine sources: one commit."""
    shutil.copytree(sources, destination)
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "LLaVA v1.2.2"]):
        result = run(GIT + command, cwd=destination)
        assert result.returncode == 0, result.stderr
    return destination


@pytest.fixture(scope="session")
def patched_tree(llava_sources, tmp_path_factory) -> Path:
    tree = git_tree(llava_sources, tmp_path_factory.mktemp("patched") / "llava-checkout")
    for patch in patches():
        result = run(GIT + ["am", "-q", str(patch)], cwd=tree)
        assert result.returncode == 0, f"{patch.name}: {result.stderr}{result.stdout}"
    return tree


def test_series_applies_in_order(llava_sources, tmp_path):
    tree = git_tree(llava_sources, tmp_path / "checkout")
    for patch in patches():
        check = run(GIT + ["apply", "--check", str(patch)], cwd=tree)
        assert check.returncode == 0, f"{patch.name} does not apply: {check.stderr}"
        applied = run(GIT + ["am", "-q", str(patch)], cwd=tree)
        assert applied.returncode == 0, f"git am {patch.name}: {applied.stderr}{applied.stdout}"
    log = run(["git", "log", "--format=%s"], cwd=tree).stdout.splitlines()
    assert len(log) == len(patches()) + 1
    assert (tree / "llava" / "model" / "voco_mask.py").exists()
    # the patched Python compiles (3.8 syntax is not checked here: this interpreter's)
    for path in (tree / "llava").rglob("*.py"):
        compile(path.read_text(), str(path), "exec")


@pytest.mark.skipif(shutil.which("patch") is None, reason="no patch(1) on this machine")
def test_series_applies_with_patch_p1(llava_sources, tmp_path):
    tree = tmp_path / "plain"
    shutil.copytree(llava_sources, tree)
    for patch in patches():
        result = run(["patch", "-p1", "--forward", "--batch", "-i", str(patch)], cwd=tree)
        assert result.returncode == 0, f"patch -p1 < {patch.name}: {result.stdout}{result.stderr}"
    assert not list(tree.rglob("*.rej"))


def test_generated_patch_is_not_stale(tmp_path):
    """The patch adding llava/model/voco_mask.py is our module, verbatim: regenerate and compare bytes."""
    result = run([sys.executable, str(ROOT / "scripts" / "make_patches.py"), "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    (generated,) = tmp_path.glob("*.patch")
    committed = SERIES / generated.name
    assert committed.exists(), f"{committed.name} missing: run python scripts/make_patches.py"
    assert committed.read_bytes() == generated.read_bytes(), (
        f"{committed} is stale (llava_voco/model/voco_mask.py changed): run python scripts/make_patches.py"
    )
    assert sorted(SERIES.glob("0001-*.patch")) == [committed]


def test_carried_module_is_the_rule_verbatim(patched_tree):
    carried = (patched_tree / "llava" / "model" / "voco_mask.py").read_text()
    ours = (ROOT / "llava_voco" / "model" / "voco_mask.py").read_text()
    assert carried.endswith(ours) and carried.startswith("# GENERATED FILE")
    assert "import transformers" not in ours and "from transformers" not in ours  # it must run on LLaVA's pins
    # the rule is written once: the patched LLaVA code never builds a mask row by hand
    for path in (patched_tree / "llava").rglob("*.py"):
        if path.name != "voco_mask.py":
            assert "key_visible_until" not in path.read_text(), path


# --------------------------------------------------------------------------------- LLaVA's pinned stack

def _pip(python: Path, *args: str, timeout: int = 900) -> None:
    command = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args]
    result = run(command, timeout=timeout)
    if result.returncode != 0:
        errors = "\n".join(line for line in result.stderr.splitlines() if "WARNING: Location" not in line)
        pytest.skip(f"LLaVA's pinned stack does not install here: {' '.join(command[1:])}: {errors[-1500:]}")


@pytest.fixture(scope="session")
def pinned_python() -> Path:
    """Python of a virtual environment with LLaVA v1.2.2's pinned stack (cached under .cache/patches/venv)."""
    venv = CACHE / "venv"
    marker = venv / "installed.json"
    if marker.exists() and json.loads(marker.read_text()) == PINNED:
        return venv / "bin" / "python"
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = CACHE / f"venv.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    result = run([sys.executable, "-m", "venv", str(partial)])
    if result.returncode != 0:
        pytest.skip(f"python -m venv failed: {result.stderr[-800:]}")
    _pip(partial / "bin" / "python", *PINNED)
    (partial / "installed.json").write_text(json.dumps(PINNED))
    shutil.rmtree(venv, ignore_errors=True)
    _publish(partial, venv)
    return venv / "bin" / "python"


@pytest.fixture(scope="session")
def overlay_437(pinned_python) -> Path:
    """transformers 4.37.2 (and its tokenizers) in a folder put first on PYTHONPATH."""
    target = CACHE / "overlay-transformers-4.37.2"
    if (target / "installed.json").exists():
        return target
    partial = CACHE / f"overlay.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    _pip(pinned_python, "--no-deps", "--target", str(partial), *OVERLAY_437)
    (partial / "installed.json").write_text(json.dumps(OVERLAY_437))
    _publish(partial, target)
    return target


def llava_side(python: Path, command: str, workdir: Path, tree: Path, overlay: Path | None = None, timeout=600):
    """Run tests/patches_support/llava_side.py in the pinned venv: the patched LLaVA tree first on the path,
    then the transformers overlay (if any), then the venv's site-packages."""
    path = [str(tree)] + ([str(overlay)] if overlay is not None else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    result = run([str(python), str(SUPPORT / "llava_side.py"), command, str(workdir)], env=env, timeout=timeout)
    assert result.returncode == 0, f"llava_side.py {command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


# ------------------------------------------------------------------------------------------ our side

@pytest.fixture(scope="session")
def voco_model(tmp_path_factory):
    """A tiny VoCoLlavaForConditionalGeneration (k=1) from llava_voco.demo.tiny, and its config."""
    import llava_voco
    from llava_voco.demo.tiny import build_tiny_llava

    path = tmp_path_factory.mktemp("tiny_llava_for_patches")
    build_tiny_llava(path, seed=0)
    model, _ = llava_voco.add_voco_to_llava(path, voco_tokens=1)
    torch.manual_seed(1)  # the <voco> rows start at the mean; make them distinct from it
    with torch.no_grad():
        model.get_input_embeddings().weight[model.config.voco_token_id].normal_(0, 0.5)
        model.get_output_embeddings().weight[model.config.voco_token_id].normal_(0, 0.5)
    return model.eval()


def to_llava_names(state_dict: dict) -> dict:
    """Our (transformers' Llava) parameter names -> LLaVA's (LlavaLlamaForCausalLM with CLIPVisionTower)."""
    out = {}
    for key, tensor in state_dict.items():
        if key.startswith("model.language_model."):
            name = "model." + key[len("model.language_model."):]
        elif key.startswith("model.vision_tower."):
            name = "model.vision_tower.vision_tower.vision_model." + key[len("model.vision_tower."):]
        elif key.startswith("model.multi_modal_projector.linear_"):
            index = {"1": "0", "2": "2"}[key.split("linear_")[1][0]]
            name = f"model.mm_projector.{index}." + key.split(".")[-1]
        elif key == "lm_head.weight":
            name = key
        else:
            raise AssertionError(f"unmapped parameter {key}")
        out[name] = tensor.detach().clone().contiguous()
    return out


def batch(config, tokens_per_image: int):
    """Two rows, right-padded: one image; two images. Ours (image and VoCo tokens written out) and LLaVA's
    (one IMAGE_TOKEN_INDEX per image; the patched model inserts the VoCo embedding)."""
    image, voco, pad = config.image_token_id, config.voco_token_id, config.text_config.pad_token_id
    generator = torch.Generator().manual_seed(0)

    def text(n):
        return torch.randint(10, 300, (n,), generator=generator).tolist()

    rows = [
        [1] + text(5) + ["I"] + text(7),
        [1] + text(3) + ["I"] + text(4) + ["I"] + text(6),
    ]
    ours, llava = [], []
    for row in rows:
        ours.append([t for token in row for t in ([image] * tokens_per_image + [voco] if token == "I" else [token])])
        llava.append([-200 if t == "I" else t for t in row])

    def pad_rows(rows, fill):
        width = max(map(len, rows))
        ids = torch.tensor([r + [fill] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return ids, mask

    our_ids, our_mask = pad_rows(ours, pad)
    llava_ids, llava_mask = pad_rows(llava, pad)
    # labels: the text after each row's first image (a loss to compare; LLaVA masks its image positions itself)
    our_labels = torch.full_like(our_ids, -100)
    llava_labels = torch.full_like(llava_ids, -100)
    for r in range(len(rows)):
        first_voco = int((our_ids[r] == voco).nonzero()[0])
        our_labels[r, first_voco + 1:] = torch.where(our_mask[r, first_voco + 1:].bool(), our_ids[r, first_voco + 1:], -100)
        first_image = int((llava_ids[r] == -200).nonzero()[0])
        llava_labels[r, first_image + 1:] = torch.where(
            llava_mask[r, first_image + 1:].bool(), llava_ids[r, first_image + 1:], -100
        )
        llava_labels[r][llava_ids[r] == -200] = -100
        our_labels[r][(our_ids[r] == image) | (our_ids[r] == voco)] = -100
    pixels = torch.randn(3, 3, config.vision_config.image_size, config.vision_config.image_size, generator=generator)
    return (
        {"input_ids": our_ids, "attention_mask": our_mask, "pixel_values": pixels, "labels": our_labels},
        {"input_ids": llava_ids, "attention_mask": llava_mask, "pixel_values": pixels, "labels": llava_labels},
    )


def spec_of(model) -> dict:
    config, text = model.config, model.config.text_config
    vision = config.vision_config
    return {
        "sizes": {
            "vision_hidden": vision.hidden_size, "vision_layers": vision.num_hidden_layers,
            "heads": text.num_attention_heads, "image_size": vision.image_size, "patch_size": vision.patch_size,
            "text_hidden": text.hidden_size, "text_layers": text.num_hidden_layers, "kv_heads": text.num_key_value_heads,
        },
        "vocab_size": text.vocab_size, "bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id,
        "pad_token_id": text.pad_token_id, "voco_tokens": config.voco_tokens, "voco_token_id": config.voco_token_id,
    }


@pytest.mark.parametrize("transformers_version", ["4.36.2", "4.37.2"])
def test_patched_llava_matches_voco_llava(
    transformers_version, voco_model, patched_tree, pinned_python, request, tmp_path
):
    overlay = request.getfixturevalue("overlay_437") if transformers_version == "4.37.2" else None
    model = voco_model
    assert model.config.vision_config.hidden_size == 32 and model.config.text_config.intermediate_size == 128
    tokens_per_image = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    ours, theirs = batch(model.config, tokens_per_image)
    save_file(to_llava_names(model.state_dict()), tmp_path / "weights.safetensors")
    save_file({k: v.contiguous() for k, v in theirs.items()}, tmp_path / "inputs.safetensors")
    (tmp_path / "spec.json").write_text(json.dumps(spec_of(model)))
    llava_side(pinned_python, "logits", tmp_path, patched_tree, overlay)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["transformers"] == transformers_version
    assert meta["attention"] == {"eager": "LlamaAttention", "sdpa": "LlamaSdpaAttention"}
    outputs = load_file(tmp_path / "outputs.safetensors")

    real = ours["attention_mask"].bool()
    differences = {}
    for mode in ("paper", "official"):
        model.config.voco_mask_mode = mode
        try:
            with torch.no_grad():
                expected = model(**ours)
        finally:
            model.config.voco_mask_mode = "paper"
        for implementation in ("eager", "sdpa"):
            got = outputs[f"logits_{implementation}_{mode}"]
            assert got.shape == expected.logits.shape
            difference = (got - expected.logits)[real].abs().max().item()
            differences[f"{implementation}/{mode}"] = difference
            assert difference < TOLERANCE, f"{implementation}/{mode}: logits differ by {difference}"
            loss = outputs[f"loss_{implementation}_{mode}"].item()
            assert math.isclose(loss, expected.loss.item(), abs_tol=TOLERANCE), (loss, expected.loss.item())

            # compress once == full sequence, and answer() from the cache == generate() with the mask
            full = outputs[f"full_text_logits_{implementation}_{mode}"]
            compressed = outputs[f"compressed_text_logits_{implementation}_{mode}"]
            cache_difference = (full - compressed).abs().max().item()
            differences[f"{implementation}/{mode}/compressed"] = cache_difference
            assert cache_difference < TOLERANCE
            assert torch.equal(outputs[f"generate_{implementation}_{mode}"], outputs[f"answer_{implementation}_{mode}"])
            # row 0 is [BOS, 5 text, image (16), VoCo (1), 7 text]: the cache keeps the prefix and the VoCo
            # token (paper) or the VoCo token alone (official); text resumes at position 23
            assert meta[f"cache_positions_{implementation}_{mode}"] == (7 if mode == "paper" else 1)
            assert meta[f"next_position_{implementation}_{mode}"] == 6 + tokens_per_image + 1
    # the modes differ (the mask matters)
    assert not torch.allclose(outputs["logits_sdpa_paper"], outputs["logits_sdpa_official"])
    print(f"transformers {transformers_version}: max |logit difference| {differences}")


def test_llava_train_py_and_model_vqa_run_with_voco(patched_tree, pinned_python, tmp_path):
    """LLaVA's own train.py, 12 steps on CPU, --voco_tokens 1: the loss falls; <voco> and k are saved. Then
    its model_vqa.py answers from that checkpoint, with and without --voco-cache."""
    llava_side(pinned_python, "train", tmp_path, patched_tree, timeout=900)
    report = json.loads((tmp_path / "train_result.json").read_text())
    losses = report["losses"]
    print("train.py --voco_tokens 1 losses:", [round(x, 3) for x in losses])
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    assert not report["tokenization_mismatch"]
    assert report["config"]["voco_tokens"] == 1 and report["config"]["voco_mask_mode"] == "paper"
    assert report["config"]["voco_token_id"] == report["tokenizer_voco_id"]
    assert report["config"]["vocab_size"] > report["tokenizer_voco_id"]

    # LLaVA's llava/eval/model_vqa.py on that checkpoint (on CPU: see llava_side.vqa), greedy: --voco-cache
    # (compress once, answer from the compressed cache) gives generate()'s answers; 3 questions on 2 images
    # compress twice
    llava_side(pinned_python, "vqa", tmp_path, patched_tree)
    answers = json.loads((tmp_path / "vqa_result.json").read_text())
    print("model_vqa.py answers:", answers)
    assert len(answers["generate"]) == 3 and all(answers["generate"])
    assert answers["voco_cache"] == answers["generate"]
    assert answers["compressions"] == 2


def test_flash_attention_is_refused(patched_tree, pinned_python, tmp_path):
    """train_mem.py's flash_attention_2 cannot take the VoCo mask: refused before anything loads."""
    script = (
        "import sys\n"
        "sys.argv = ['train', '--model_name_or_path', 'none', '--vision_tower', 'none', '--voco_tokens', '1',\n"
        "            '--output_dir', sys.argv[1], '--use_cpu', 'True', '--report_to', 'none']\n"
        "from llava.train.train import train\n"
        "try:\n"
        "    train(attn_implementation='flash_attention_2')\n"
        "except ValueError as error:\n"
        "    print('REFUSED:', error)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(patched_tree), "PYTHONWARNINGS": "ignore"}
    result = run([str(pinned_python), "-c", script, str(tmp_path)], env=env, timeout=300)
    assert "REFUSED:" in result.stdout and "train_mem.py" in result.stdout, result.stdout + result.stderr[-3000:]
