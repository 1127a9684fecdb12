"""The cache store under the server: any fsspec root, and one compression for concurrent askers."""

from __future__ import annotations

import threading
import uuid

from conftest import load_voco, prompt

from llava_voco.inference import count_vision_passes
from llava_voco.serve.cache_store import VoCoCacheStore


def test_an_fsspec_memory_store_keeps_evicts_and_drops_corrupt_entries(voco_dir, digit_images):
    model, processor = load_voco(voco_dir)
    text = prompt(processor, "What is in the image?").split("\n")[0]  # up to the image
    root = f"memory://voco-{uuid.uuid4().hex}"
    store = VoCoCacheStore(root)
    assert not store.is_local
    cache, hit = store.get_or_compress(model, processor, [digit_images[0]], text)
    assert not hit and len(store.entries()) == 1 and store.entries()[0].startswith(store.root)
    again, hit = VoCoCacheStore(root).get_or_compress(model, processor, [digit_images[0]], text)  # another handle
    assert hit and again.token_ids.tolist() == cache.token_ids.tolist()
    for layer, other in zip(cache.layers, again.layers):
        assert layer.keys.equal(other.keys) and layer.values.equal(other.values)
    entry = store.entries()[0]
    store.fs.pipe_file(entry, b"not a cache")
    assert store.get(entry.rsplit("/", 1)[1].split(".")[0], model) is None and store.entries() == []
    store.put("ab" * 32, cache)
    size = store.size_bytes()  # one entry
    small = VoCoCacheStore(root, max_bytes=int(size * 1.5))
    for index in (1, 2):
        small.get_or_compress(model, processor, [digit_images[index]], text)
    assert len(small.entries()) == 1 and small.size_bytes() <= small.max_bytes


def test_concurrent_askers_of_one_image_wait_for_one_compression(voco_dir, tmp_path, digit_images):
    model, processor = load_voco(voco_dir)
    text = prompt(processor, "What is in the image?").split("\n")[0]
    store = VoCoCacheStore(f"file://{tmp_path / 'store'}")
    assert store.is_local
    hits, errors = [], []

    def ask():
        try:
            hits.append(store.get_or_compress(model, processor, [digit_images[3]], text)[1])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    with count_vision_passes(model) as vision:
        threads = [threading.Thread(target=ask) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert not errors and sorted(hits) == [False, True, True, True]
    assert vision["passes"] == 1
