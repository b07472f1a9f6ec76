"""Shard integrity: the manifest's sizes and hashes, verify(), and damaged files named on read."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from apo_jax.data import loader, shards


@pytest.fixture
def shard_copy(tmp_path, small_shards):
    """A private copy of the 3 small shards (16 + 16 + 8 records), free to damage."""
    return shutil.copytree(small_shards, tmp_path / "shards")


def _damage(path, *, truncate_to=None, flip_at=None):
    data = bytearray(open(path, "rb").read())
    if truncate_to is not None:
        data = data[:truncate_to]
    if flip_at is not None:
        data[flip_at] ^= 0x10
    open(path, "wb").write(bytes(data))


def test_manifest_records_size_and_hashes_of_every_shard(small_shards):
    entries = shards.read_manifest(small_shards)["shards"]
    assert [(e["file"], e["records"]) for e in entries] == [
        ("pairs-00000.array_record", 16),
        ("pairs-00001.array_record", 16),
        ("pairs-00002.array_record", 8),
    ]
    for e in entries:
        path = os.path.join(small_shards, e["file"])
        assert e["bytes"] == os.path.getsize(path) and e["sha256"] == shards.file_sha256(path)
        assert e["sample_sha256"] == shards.sample_sha256(path)
    shards.verify(small_shards)
    shards.verify(small_shards, full=True)


@pytest.mark.parametrize(
    "damage, full, message",
    [
        ("truncate", False, "bytes, manifest.json says"),
        ("swap", False, "contents differ from manifest.json"),
        ("flip", False, "contents differ from manifest.json"),
        ("delete", False, "shard listed in manifest.json is missing"),
        ("extra", False, "shard not listed in manifest.json"),
    ],
)
def test_verify_names_the_damaged_file(shard_copy, damage, full, message):
    target = shard_copy / "pairs-00001.array_record"
    if damage == "truncate":
        _damage(target, truncate_to=os.path.getsize(target) - 1)
    elif damage == "swap":  # one shard replaced by a copy of another of the same size
        shutil.copy(shard_copy / "pairs-00000.array_record", target)
        assert os.path.getsize(target) == os.path.getsize(shard_copy / "pairs-00001.array_record")
    elif damage == "flip":  # inside the 64 KiB at each end that the fast check hashes
        _damage(target, flip_at=100)
    elif damage == "delete":
        target.unlink()
    else:
        target = shard_copy / "pairs-00003.array_record"
        shutil.copy(shard_copy / "pairs-00002.array_record", target)
    with pytest.raises(shards.ShardError) as e:
        shards.verify(str(shard_copy), full=full)
    assert str(e.value).startswith(f"{target}: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_full_verify_reads_every_byte(tmp_path):
    path = tmp_path / "pairs-00000.array_record"
    path.write_bytes(os.urandom(300 << 10))  # longer than the two 64 KiB ends
    manifest = {"shards": [shards.shard_entry(str(path), 1)]}
    (tmp_path / shards.MANIFEST).write_text(json.dumps(manifest))
    _damage(path, flip_at=150 << 10)
    shards.verify(str(tmp_path))  # the fast check reads only the ends
    with pytest.raises(shards.ShardError, match=f"{path}: sha256 differs from manifest.json"):
        shards.verify(str(tmp_path), full=True)


def test_verify_refuses_a_manifest_without_sizes(shard_copy):
    path = shard_copy / shards.MANIFEST
    manifest = json.loads(path.read_text())
    del manifest["shards"][0]["bytes"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(shards.ShardError, match="no size or hash for pairs-00000.array_record"):
        shards.verify(str(shard_copy))


def _read_all(shard_dir):
    config = loader.LoaderConfig(batch_size=4, num_epochs=1, shuffle=False)
    return sum(
        1 for _ in loader.make_loader(str(shard_dir), config, process_index=0, process_count=1)
    )


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_shard_read_by_the_loader_is_one_line_naming_it(shard_copy, damage):
    assert _read_all(shard_copy) == 10
    target = shard_copy / "pairs-00001.array_record"
    if damage == "truncate":
        _damage(target, truncate_to=os.path.getsize(target) // 2)
    else:  # inside the first records' chunk: the reader's chunk hash catches it on read
        _damage(target, flip_at=500)
    with pytest.raises(shards.ShardError) as e:
        _read_all(shard_copy)
    assert str(e.value).startswith(f"{target}: damaged shard (")
    assert "\n" not in str(e.value) and "re-run python -m apo_jax.data.prepare" in str(e.value)
