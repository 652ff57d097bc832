"""Downsampled ImageNet on tiny files written here in the official npz layout (no download exists)."""

import os
import re
import zipfile

import numpy as np
import pytest
import torch

import datamodules.imagenet as imagenet
from datamodules import ImageNet32DataModule, ImageNet64DataModule
from datamodules.base import MemmapImages


def official_batch(n: int, s: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """What one official npz holds: uint8 rows of 3*s*s (R plane, G plane, B plane) and labels 1..1000."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3 * s * s), dtype=np.uint8), rng.integers(1, 1001, size=n)


def write_official(data_dir, s: int, counts=(3,) * 10, val_count: int = 4, compressed=False) -> dict:
    """The two unzipped official archives; returns the arrays written, by file name."""
    save = np.savez_compressed if compressed else np.savez
    written = {}
    (data_dir / f"Imagenet{s}_train_npz").mkdir(parents=True)
    (data_dir / f"Imagenet{s}_val_npz").mkdir(parents=True)
    for i, n in enumerate(counts, start=1):
        data, labels = official_batch(n, s, seed=i)
        name = f"train_data_batch_{i}.npz"
        # The official training batches also hold the mean image; the labels are a plain list.
        save(data_dir / f"Imagenet{s}_train_npz" / name, data=data, labels=list(labels), mean=data.mean(0))
        written[name] = (data, labels)
    data, labels = official_batch(val_count, s, seed=99)
    save(data_dir / f"Imagenet{s}_val_npz" / "val_data.npz", data=data, labels=labels)
    written["val_data.npz"] = (data, labels)
    return written


def as_images(rows: np.ndarray, s: int) -> torch.Tensor:
    """Rows -> (N, 3, s, s), written independently of the module: plane c is row[c*s*s:(c+1)*s*s]."""
    planes = [rows[:, c * s * s : (c + 1) * s * s].reshape(-1, s, s) for c in range(3)]
    return torch.from_numpy(np.stack(planes, axis=1))


def pairs(images: torch.Tensor, labels) -> list:
    return sorted(zip(map(bytes, images.flatten(1).numpy()), (int(v) for v in labels), strict=True))


def collect(loader) -> dict:
    batches = list(loader)
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


@pytest.mark.parametrize("compressed", [False, True])
def test_imagenet32_from_official_files(tmp_path, compressed):
    written = write_official(tmp_path, 32, compressed=compressed)
    dm = ImageNet32DataModule(data_dir=str(tmp_path), batch_size=4, val_size=5)
    dm.prepare_data()
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 25, "val": 5, "test": 4}
    assert all(isinstance(v, MemmapImages) for v in dm.splits.values()), "read from disk, not loaded"
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(tmp_path / "Imagenet32_uint8"):  # as open() would make them, not owner-only
        assert os.stat(tmp_path / "Imagenet32_uint8" / name).st_mode & 0o777 == 0o666 & ~umask

    # test = the official validation file, in order, pixel for pixel, labels minus one.
    test = collect(dm.test_dataloader())
    data, labels = written["val_data.npz"]
    assert test["levels"].dtype == torch.uint8 and test["levels"].shape == (4, 3, 32, 32)
    assert torch.equal(test["levels"], as_images(data, 32))
    assert torch.equal(test["label"], torch.from_numpy(labels - 1)) and torch.equal(
        test["index"], torch.arange(4)
    )

    # train and val partition the ten training files, each image with its own label.
    rows = np.concatenate([written[n][0] for n in imagenet.train_files()])
    classes = np.concatenate([written[n][1] for n in imagenet.train_files()]) - 1
    seen = [collect(dm.train_dataloader()), collect(dm.val_dataloader())]
    assert sorted(seen[0]["index"].tolist()) == list(range(25)) and seen[1]["index"].tolist() == list(
        range(5)
    )
    got = pairs(torch.cat([s["levels"] for s in seen]), torch.cat([s["label"] for s in seen]))
    assert got == pairs(as_images(rows, 32), classes)
    assert torch.equal(dm.labels["val"], seen[1]["label"])

    # The same split on every run; the cache is reused, not rebuilt.
    again = ImageNet32DataModule(data_dir=str(tmp_path), val_size=5)
    again.convert = lambda split: pytest.fail("rebuilt an unchanged cache")
    again.setup("fit")
    assert torch.equal(collect(again.val_dataloader())["levels"], seen[1]["levels"])
    # A slice gives levels, as slicing an in-memory split does (sample.py and the completion grid do).
    assert torch.equal(dm.splits["test"][1:3], as_images(data[1:3], 32))
    assert dm.splits["test"][4:].shape == (0, 3, 32, 32) and dm.splits["test"][4:].dtype == torch.uint8
    head = dm.head("test", 2)
    assert torch.equal(head["levels"], as_images(data[:2], 32)) and head["label"].tolist() == list(
        labels[:2] - 1
    )


def test_imagenet_workers_read_from_disk(tmp_path):
    """Two DataLoader workers (forked) each open the file themselves and return the same images."""
    write_official(tmp_path, 32, counts=(4,) * 10)
    dm = ImageNet32DataModule(data_dir=str(tmp_path), batch_size=3, num_workers=2, val_size=6)
    dm.setup("fit")
    in_workers = collect(dm.val_dataloader())
    dm.num_workers = 0
    assert torch.equal(in_workers["levels"], collect(dm.val_dataloader())["levels"])
    assert in_workers["index"].tolist() == list(range(6))


def test_imagenet64_and_the_wrong_size(tmp_path):
    written = write_official(tmp_path, 64, counts=(1,) * 10, val_count=2)
    dm = ImageNet64DataModule(data_dir=str(tmp_path), val_size=2)
    dm.setup("test")
    assert torch.equal(collect(dm.test_dataloader())["levels"], as_images(written["val_data.npz"][0], 64))
    # 64x64 files where the 32x32 set is expected: named, with the likely cause.
    os.rename(tmp_path / "Imagenet64_train_npz", tmp_path / "Imagenet32_train_npz")
    os.rename(tmp_path / "Imagenet64_val_npz", tmp_path / "Imagenet32_val_npz")
    with pytest.raises(
        ValueError, match=r"train_data_batch_1\.npz: 'data' is uint8 \(1, 12288\).*32x32 set\?"
    ):
        ImageNet32DataModule(data_dir=str(tmp_path)).prepare_data()


def test_imagenet_missing_files_one_error(tmp_path):
    write_official(tmp_path, 32)
    os.remove(tmp_path / "Imagenet32_train_npz" / "train_data_batch_3.npz")
    os.remove(tmp_path / "Imagenet32_train_npz" / "train_data_batch_10.npz")
    os.remove(tmp_path / "Imagenet32_val_npz" / "val_data.npz")
    dm = ImageNet32DataModule(data_dir=str(tmp_path))
    message = (
        r"^ImageNet 32x32 not found: put train_data_batch_3\.npz, train_data_batch_10\.npz in "
        + re.escape(str(tmp_path / "Imagenet32_train_npz"))
        + r"; put val_data\.npz in "
        + re.escape(str(tmp_path / "Imagenet32_val_npz"))
        + r" \(download .*image-net\.org.*Downsampled ImageNet"
    )
    with pytest.raises(FileNotFoundError, match=message):
        dm.prepare_data()
    with pytest.raises(FileNotFoundError, match=message):
        dm.setup("fit")
    assert not (tmp_path / "Imagenet32_uint8").exists(), "nothing converted from a partial set"


def test_imagenet_nothing_there(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"put train_data_batch_1\.npz, .*train_data_batch_10\.npz in"
    ):
        ImageNet64DataModule(data_dir=str(tmp_path / "nowhere")).prepare_data()


def cache_listing(tmp_path) -> list[str]:
    return sorted(os.listdir(tmp_path / "Imagenet32_uint8"))


def test_imagenet_interrupted_conversion_is_rebuilt(tmp_path, monkeypatch):
    write_official(tmp_path, 32)
    original = imagenet.SourceFile.copy_into
    calls = []

    def dies_on_the_fourth_file(self, out, labels):
        calls.append(self.path)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as Ctrl-C halfway through
        original(self, out, labels)

    monkeypatch.setattr(imagenet.SourceFile, "copy_into", dies_on_the_fourth_file)
    dm = ImageNet32DataModule(data_dir=str(tmp_path), val_size=5)
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    assert cache_listing(tmp_path) == [], "no temporary file, no half array, no manifest"

    monkeypatch.setattr(imagenet.SourceFile, "copy_into", original)
    dm.prepare_data()
    assert cache_listing(tmp_path) == [
        f"{split}_{what}"
        for split in ("official_val", "train")
        for what in ("images.npy", "labels.npy", "manifest.json")
    ]
    dm.setup("fit")
    assert len(dm.splits["train"]) == 25


def test_imagenet_stale_or_damaged_cache_is_rebuilt(tmp_path):
    written = write_official(tmp_path, 32)
    ImageNet32DataModule(data_dir=str(tmp_path), val_size=5).prepare_data()
    rebuilt = []

    def fresh():
        dm = ImageNet32DataModule(data_dir=str(tmp_path), val_size=5)
        convert = dm.convert
        dm.convert = lambda split: (rebuilt.append(split), convert(split))
        return dm

    # A source file replaced by different images: its size or modification time changes.
    data, labels = official_batch(4, 32, seed=123)
    np.savez(tmp_path / "Imagenet32_val_npz" / "val_data.npz", data=data, labels=labels)
    dm = fresh()
    dm.setup("test")
    assert rebuilt == ["official_val"]
    assert torch.equal(collect(dm.test_dataloader())["levels"], as_images(data, 32))

    # A truncated array (say, a copy cut short) is rebuilt, not read past its end.
    path = tmp_path / "Imagenet32_uint8" / "train_images.npy"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    rebuilt.clear()
    dm = fresh()
    dm.setup("fit")
    assert rebuilt == ["train"]
    rows = np.concatenate([written[n][0] for n in imagenet.train_files()])
    seen = torch.cat([collect(dm.train_dataloader())["levels"], collect(dm.val_dataloader())["levels"]])
    assert sorted(map(bytes, seen.flatten(1).numpy())) == sorted(
        map(bytes, as_images(rows, 32).flatten(1).numpy())
    )


@pytest.mark.parametrize(
    ("write", "error"),
    [
        (
            lambda p: p.write_bytes(b"<html>login</html>"),
            r"train_data_batch_2\.npz is not a readable npz file",
        ),
        (
            lambda p: np.savez(p, data=official_batch(3, 32, 0)[0]),
            r"train_data_batch_2\.npz has no 'labels' array",
        ),
        (
            lambda p: np.savez(p, data=official_batch(3, 32, 0)[0], labels=np.zeros(3, dtype=np.int64)),
            r"train_data_batch_2\.npz: labels span 0\.\.0, expected 1\.\.1000",
        ),
        (
            lambda p: np.savez(p, data=official_batch(3, 32, 0)[0].astype(np.float32), labels=np.ones(3)),
            r"train_data_batch_2\.npz: 'data' is float32",
        ),
        (
            lambda p: np.savez(p, data=official_batch(3, 32, 0)[0], labels=np.ones(2, dtype=np.int64)),
            r"'labels' is int64 \(2,\), expected 3 integers",
        ),
    ],
)
def test_imagenet_bad_file_is_named(tmp_path, write, error):
    write_official(tmp_path, 32)
    write(tmp_path / "Imagenet32_train_npz" / "train_data_batch_2.npz")
    with pytest.raises(ValueError, match=error):
        ImageNet32DataModule(data_dir=str(tmp_path)).prepare_data()
    assert not os.path.exists(tmp_path / "Imagenet32_uint8" / "train_manifest.json")


def test_imagenet_corrupt_bytes_inside_the_zip(tmp_path):
    """A flipped byte inside a stored member fails the zip's CRC check: an error, never silent garbage."""
    write_official(tmp_path, 32)
    path = tmp_path / "Imagenet32_train_npz" / "train_data_batch_5.npz"
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("data.npy")
    raw = bytearray(path.read_bytes())
    raw[info.header_offset + 30 + len(info.filename) + len(info.extra) + 200] ^= 0xFF  # past the npy header
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"train_data_batch_5\.npz is corrupt \(.*CRC"):
        ImageNet32DataModule(data_dir=str(tmp_path)).prepare_data()
    assert not os.path.exists(tmp_path / "Imagenet32_uint8" / "train_manifest.json")


def test_imagenet_cache_dir_and_val_size(tmp_path):
    write_official(tmp_path / "data", 32)
    dm = ImageNet32DataModule(data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), val_size=30)
    with pytest.raises(ValueError, match=r"data\.val_size=30 must be below the 30 training images"):
        dm.setup("fit")
    assert (tmp_path / "cache" / "train_images.npy").is_file()
    with pytest.raises(ValueError, match=r"data\.val_size=0 must be at least 1"):
        ImageNet32DataModule(data_dir=str(tmp_path), val_size=0)
