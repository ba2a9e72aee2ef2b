"""Tar shards (mimkit.data.shards): writing, streaming order, rank/worker split, resume, bad input."""
import logging
import os

import numpy as np
import pytest
import torch

from mimkit.data import make_loader, open_images
from mimkit.data.shards import ShardSource, buffer_order, write_shards
from mimkit.errors import DataError

from helpers_faults import noise_folder

pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """42 distinct 32x32 images in 3 class folders (dotted names: a webdataset key ends at the first dot)."""
    return noise_folder(tmp_path_factory.mktemp("imgs"), classes=3, per_class=14, name="class{c}/im.{i}.png")


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    return write_shards(folder, tmp_path_factory.mktemp("shards"), shard_size=5)


def _epoch(src, epoch=0, start=0, **kw):
    kw = {"batch_size": 4, "img_size": 32, "aug": "rrc", "seed": 3, "num_workers": 0, "with_index": True, **kw}
    loader = make_loader(src, **kw)
    loader.set_epoch(epoch, start)
    return [(x, y, i) for x, y, i in loader]


def test_write_and_read_labels(folder, shards):
    """Every image lands in a shard, byte for byte, with its class; dropping the .cls field fails this."""
    src, ref = open_images(shards), open_images(folder)
    assert isinstance(src, ShardSource) and len(src.urls) == 9 and len(src) == len(ref) == 42
    for i in range(len(src)):
        j = ref.names.index(src.names[i].split(":", 1)[1].replace("im_", "im."))
        assert src.read_bytes(i) == ref.read_bytes(j) and src.labels[i] == ref.labels[j]
    assert src.classes == ["0", "1", "2"]


def test_each_image_once_per_epoch_across_ranks_and_streams(shards):
    """Two ranks with two streams each read disjoint images that cover the epoch (up to the dropped remainder);
    giving both ranks the same streams (ignoring the rank) fails this."""
    src = open_images(shards)
    seen = []
    for rank in range(2):
        for x, y, idx in _epoch(src, rank=rank, world_size=2, streams=4, batch_size=2):
            assert x.shape[1:] == (3, 32, 32)
            seen += idx.tolist()
    assert len(seen) == len(set(seen)) >= len(src) - 4 * 2  # at most one global batch's worth dropped


def test_order_fixed_by_seed_and_epoch(shards):
    """Same seed and epoch: identical batches; another epoch or seed: another order. A shard order that ignores
    the epoch fails this (the check with a buffer of 1 image, i.e. no local shuffle)."""
    src = open_images(shards)
    a, b = _epoch(src, streams=2), _epoch(src, streams=2)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[2], q[2]) for p, q in zip(a, b))
    other_epoch = torch.cat([p[2] for p in _epoch(src, epoch=1, streams=2)])
    other_seed = torch.cat([p[2] for p in _epoch(src, streams=2, seed=4)])
    order = torch.cat([p[2] for p in a])
    assert not torch.equal(order, other_epoch) and not torch.equal(order, other_seed)
    in_shards = [torch.cat([p[2] for p in _epoch(src, epoch=e, streams=2, shuffle_buffer=1)]) for e in (0, 1)]
    assert not torch.equal(*in_shards)


def test_global_batches_do_not_depend_on_the_process_split(shards):
    """2 processes x 1 stream == 1 process x 2 streams == 1 process x 2 streams in 2 worker processes, tensor for
    tensor; seeding augmentation by worker process instead of by image fails this."""
    src = open_images(shards)
    one = _epoch(src, streams=2, batch_size=4)
    r0, r1 = (_epoch(src, rank=r, world_size=2, streams=2, batch_size=2) for r in (0, 1))
    workers = _epoch(src, streams=2, batch_size=4, num_workers=2)
    assert len(one) == len(r0) == len(r1) == len(workers) > 0
    for (x, y, i), a, b, w in zip(one, r0, r1, workers):
        assert torch.equal(x, torch.cat([a[0], b[0]])) and torch.equal(i, torch.cat([a[2], b[2]]))
        assert torch.equal(x, w[0]) and torch.equal(y, w[1])


def test_resume_mid_epoch_is_bit_identical_and_skips_reading(shards, monkeypatch):
    """set_epoch(e, k) yields exactly batches k.. of the full epoch and reads none of the first k batches' images;
    reading the skipped batches' images on resume fails this."""
    src = open_images(shards)
    full = _epoch(src, epoch=2, streams=2, shuffle_buffer=8)
    reads = []
    read = ShardSource.read_bytes
    monkeypatch.setattr(ShardSource, "read_bytes", lambda self, i: reads.append(i) or read(self, i))
    resumed = _epoch(src, epoch=2, start=3, streams=2, shuffle_buffer=8)
    assert len(resumed) == len(full) - 3
    for p, q in zip(full[3:], resumed):
        assert torch.equal(p[0], q[0]) and torch.equal(p[2], q[2])
    assert not set(reads) & set(torch.cat([p[2] for p in full[:3]]).tolist())


def test_buffer_order_is_local_and_bounded():
    """A buffer of 4 emits a permutation of the stream in which no item comes out before it was read and at most
    4 items wait at a time; a full shuffle (no buffer bound) fails this."""
    order = buffer_order(100, 4, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(100))
    emitted = set()
    for k, p in enumerate(order[:96]):  # before the final flush: item p was read by the time k + 4 items were read
        assert p <= k + 3
        emitted.add(int(p))
        assert (k + 4) - len(emitted) <= 4


def test_missing_truncated_and_corrupt(shards, tmp_path, caplog):
    """A missing shard in the range and a truncated shard are one-line DataErrors naming the shard; a corrupt
    image is skipped and named once over two epochs (warning every epoch fails this)."""
    base = os.path.dirname(shards)
    with pytest.raises(DataError, match=r"shard-000009\.tar does not exist"):
        open_images(os.path.join(base, "shard-{000000..000009}.tar"))
    cut = tmp_path / "cut"
    cut.mkdir()
    data = open(os.path.join(base, "shard-000000.tar"), "rb").read()
    (cut / "s-000000.tar").write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=r"s-000000\.tar: shard is truncated") as e:
        open_images(str(cut / "s-{000000..000000}.tar"))
    assert "\n" not in str(e.value)
    # a shard whose first image's bytes are garbage
    bad = tmp_path / "bad"
    bad.mkdir()
    src = open_images(shards)
    off, n = src.offsets[0]
    raw = bytearray(data)
    raw[off:off + n] = b"\x00" * n
    (bad / "b-000000.tar").write_bytes(bytes(raw))
    src = open_images(str(bad / "b-{000000..000000}.tar"))
    loader = make_loader(src, batch_size=5, img_size=32, num_workers=0, shuffle_buffer=1)
    with caplog.at_level(logging.WARNING):
        for epoch in range(2):
            loader.set_epoch(epoch)
            n_img = sum(len(x) for x, _ in loader)
            assert n_img == 4
    assert list(loader.skipped) == [src.names[0]]
    assert sum("skipping image" in r.message for r in caplog.records) == 1


def test_cli_shards_then_pretrain(folder, tmp_path, capsys):
    """`mimkit shards` writes the pattern it prints, and pretraining streams it; a second write into the same
    folder is refused in one line."""
    from mimkit.cli import main
    assert main(["shards", str(folder), str(tmp_path / "sh"), "--shard-size", "16"]) == 0
    pattern = capsys.readouterr().out.split("--data '")[1].split("'")[0]
    assert pattern.endswith("shard-{000000..000002}.tar")
    assert main(["pretrain", "--data", pattern, "--model", "vit_micro_patch4_32", "--epochs", "1", "--batch-size",
                 "8", "--num-workers", "0", "--output", str(tmp_path / "run"), "--figure-every", "0"]) == 0
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert main(["shards", str(folder), str(tmp_path / "sh")]) == 2
    err = capsys.readouterr().err
    assert "already holds" in err and err.count("\n") == 1


def test_the_index_is_scanned_once_and_again_when_a_shard_changes(folder, tmp_path, monkeypatch):
    """A second open reads the cached index (no tar scan) and gets the same images; rewriting a shard (new size and
    time) scans that shard again; with the cache turned off every open scans."""
    import mimkit.data.shards as S
    out = write_shards(folder, tmp_path / "shards", shard_size=20)
    monkeypatch.setenv("MIMKIT_SHARD_INDEX_CACHE", str(tmp_path / "index"))
    scanned = []
    real_scan = S.scan_shard
    monkeypatch.setattr(S, "scan_shard", lambda url: scanned.append(url) or real_scan(url))
    first = ShardSource(out)
    assert len(scanned) == 3 and len(list((tmp_path / "index").iterdir())) == 3
    second = ShardSource(out)
    assert len(scanned) == 3  # nothing scanned
    assert second.names == first.names and second.labels == first.labels
    assert (second.offsets == first.offsets).all() and (second.shard_of == first.shard_of).all()
    assert second.read_bytes(7) == first.read_bytes(7)
    changed = tmp_path / "shards" / "shard-000001.tar"
    os.truncate(changed, os.path.getsize(changed) - 512)  # its last member's padding: a different file now
    ShardSource(out)
    assert scanned[3:] == [str(changed)]
    monkeypatch.setenv("MIMKIT_SHARD_INDEX_CACHE", "")
    ShardSource(out)
    assert len(scanned) == 3 + 1 + 3


def test_remote_shards_are_indexed_once_per_version(folder, tmp_path, monkeypatch):
    """Shards in an object store (fsspec's memory filesystem standing in for S3) are scanned once and read from the
    cached index next time; a rewritten object (a new version) is scanned again; a store that reports no version
    is never served from the cache."""
    import fsspec
    import mimkit.data.shards as S
    out = write_shards(folder, tmp_path / "shards", shard_size=20)
    fs = fsspec.filesystem("memory")
    for name in sorted(os.listdir(tmp_path / "shards")):
        fs.pipe(f"/bucket/{name}", (tmp_path / "shards" / name).read_bytes())
    url = "memory://bucket/" + os.path.basename(out)
    monkeypatch.setenv("MIMKIT_SHARD_INDEX_CACHE", str(tmp_path / "index"))
    local = ShardSource(out)
    scanned = []
    real_scan = S.scan_shard
    monkeypatch.setattr(S, "scan_shard", lambda u: scanned.append(u) or real_scan(u))
    first = ShardSource(url)
    assert len(scanned) == 3 and len(list((tmp_path / "index").iterdir())) == 3 + 3  # the local and remote shards
    second = ShardSource(url)
    assert len(scanned) == 3 and second.names == first.names and second.read_bytes(5) == first.read_bytes(5)
    assert first.names == local.names and first.read_bytes(5) == local.read_bytes(5)
    fs.pipe("/bucket/shard-000001.tar", fs.cat("/bucket/shard-000001.tar"))  # the same bytes, a new object
    ShardSource(url)
    assert scanned[3:] == ["memory://bucket/shard-000001.tar"]
    real_info = type(fs).info
    monkeypatch.setattr(type(fs), "info", lambda self, p, **kw: {k: v for k, v in real_info(self, p, **kw).items()
                                                                 if k != "created"})
    ShardSource(url)
    assert len(scanned) == 4 + 3
    fs.rm("/bucket", recursive=True)


def test_written_in_a_seeded_random_order_held_out_as_the_folder(folder, tmp_path):
    """`mimkit shards` mixes the classes of a class-sorted folder into every shard (the reader only shuffles within
    a buffer), yet holds out the same images as the folder; --no-shuffle keeps the folder's order. Writing in
    folder order, or splitting in shard order, fails this."""
    from mimkit.data import split_train_val
    ref = open_images(folder)
    src = open_images(write_shards(folder, tmp_path / "mixed", shard_size=5))
    assert all(len({src.labels[i] for i in range(len(src)) if src.shard_of[i] == s}) > 1 for s in range(3))
    plain_key = lambda n: n.split(":", 1)[1].replace("im_", "im.")  # noqa: E731  (the key's dot became _)
    for fraction in (0.1, 0.25):
        held_out = sorted(plain_key(src.names[i]) for i in split_train_val(src, fraction)[1])
        assert held_out == sorted(ref.names[j] for j in split_train_val(ref, fraction)[1])
    plain = open_images(write_shards(folder, tmp_path / "plain", shard_size=5, shuffle=False))
    assert [plain_key(n) for n in plain.names] == ref.names
