"""The content-addressed store of compressed images."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from llava_voco import VoCoCache, model_fingerprint
from llava_voco.serve.cache_store import VoCoCacheStore

from conftest import load_voco, prompt


def head_prompt(processor, question="What is the sum?"):
    text = prompt(processor, question)
    return text[: text.index("<image>") + len("<image>")]


def test_hit_miss_and_keys(voco_dir, digit_images, tmp_path, caplog):
    model, processor = load_voco(voco_dir)
    store = VoCoCacheStore(tmp_path / "store")
    text = head_prompt(processor)
    with caplog.at_level("WARNING"):
        cache, hit = store.get_or_compress(model, processor, [digit_images[0]], text)
    assert not hit and len(store.entries()) == 1
    assert "dropping" not in caplog.text  # a first miss is a miss, not a bad entry
    again, hit = store.get_or_compress(model, processor, [digit_images[0]], text)
    assert hit
    for ours, theirs in zip(again.layers, cache.layers):
        assert torch.equal(ours.keys, theirs.keys)
    fingerprint = model_fingerprint(model)
    key = store.key([digit_images[0]], text, fingerprint)
    assert store.path(key) == store.entries()[0] and store.path(key).parent.name == key[:2]
    assert store.key([digit_images[1]], text, fingerprint) != key
    assert store.key([digit_images[0]], text + " ", fingerprint) != key
    assert store.key([digit_images[0]], text, "another model") != key
    # a damaged entry is dropped and recomputed, never used
    store.path(key).write_bytes(b"not a cache")
    _, hit = store.get_or_compress(model, processor, [digit_images[0]], text)
    assert not hit and VoCoCache.load(store.path(key), model) is not None


def test_size_cap_evicts_least_recently_used(voco_dir, digit_images, tmp_path):
    model, processor = load_voco(voco_dir)
    text = head_prompt(processor)
    probe = VoCoCacheStore(tmp_path / "probe")
    probe.get_or_compress(model, processor, [digit_images[0]], text)
    entry_size = probe.size_bytes()

    store = VoCoCacheStore(tmp_path / "store", max_bytes=int(entry_size * 2.5))
    keys = []
    for index in range(3):
        if index == 2:  # touch the first entry: now the second is the least recently used
            time.sleep(0.02)
            assert store.get(keys[0], model) is not None
            time.sleep(0.02)
        store.get_or_compress(model, processor, [digit_images[index]], text)
        keys.append(store.key([digit_images[index]], text, model_fingerprint(model)))
        time.sleep(0.02)
    assert store.size_bytes() <= store.max_bytes
    assert store.path(keys[0]).exists() and store.path(keys[2]).exists()
    assert not store.path(keys[1]).exists()


def test_two_processes_writing_the_same_key(voco_dir, digit_images, tmp_path):
    image_path = tmp_path / "digit.png"
    digit_images[3].save(image_path)
    writer = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import load_voco
        from llava_voco.serve.cache_store import VoCoCacheStore
        from llava_voco import model_fingerprint
        model, processor = load_voco({str(voco_dir)!r})
        store = VoCoCacheStore({str(tmp_path / 'store')!r})
        text = sys.argv[1]
        cache, _ = store.get_or_compress(model, processor, [{str(image_path)!r}], text)
        key = store.key([{str(image_path)!r}], text, model_fingerprint(model))
        for _ in range(25):
            store.put(key, cache)
        print(key)
    """)
    model, processor = load_voco(voco_dir)
    text = head_prompt(processor)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    processes = [subprocess.Popen([sys.executable, "-c", writer, text], stdout=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0].split() for p in processes]
    assert all(p.returncode == 0 for p in processes)
    store = VoCoCacheStore(tmp_path / "store")
    assert outputs[0][-1] == outputs[1][-1]
    assert len(store.entries()) == 1 and not list((tmp_path / "store").rglob("*.tmp"))
    assert store.get(outputs[0][-1], model) is not None
