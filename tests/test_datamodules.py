"""Data modules on the bundled digits and on tiny files written here; nothing touches the network."""

import os
import pickle
import re
import stat
import struct
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sklearn.datasets import load_digits

import datamodules.binarized_mnist as bm
from datamodules import BinarizedMNISTDataModule, CIFAR10DataModule, DigitsDataModule, MNISTDataModule


def tree(root) -> list[str]:
    """Every file and folder under root, relative to it."""
    out = []
    for d, dirs, files in os.walk(root):
        out += [os.path.relpath(os.path.join(d, n), root) for n in dirs + files]
    return sorted(out)


def collect(loader):
    batches = list(loader)
    index = [b["index"] for b in batches]
    return torch.cat([b["levels"] for b in batches]), torch.cat(index), [len(i) for i in index]


# ---------------------------------------------------------------- digits


def test_digits_splits_batches_and_order():
    dm = DigitsDataModule(batch_size=64)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert (dm.num_channels, dm.num_levels, dm.image_size) == (1, 17, 8)
    assert dm.has_test_split()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 1197, "val": 300, "test": 300}

    batch = next(iter(dm.train_dataloader()))
    levels, index = batch["levels"], batch["index"]
    assert levels.shape == (64, 1, 8, 8) and levels.dtype == torch.uint8
    assert index.dtype == torch.int64
    assert not torch.equal(index, torch.arange(64)), "train must shuffle"
    all_train = torch.cat([b["levels"] for b in dm.train_dataloader()])
    assert int(all_train.min()) == 0 and int(all_train.max()) == 16

    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        levels, index, sizes = collect(loader)
        assert torch.equal(index, torch.arange(300)), "val/test: in order, every image exactly once"
        assert sizes == [64, 64, 64, 64, 44], "the uneven last batch is kept"
        assert not loader.persistent_workers
    # Every image is in exactly one split.
    every = torch.cat([dm.splits[s] for s in ("train", "val", "test")]).flatten(1)
    original = torch.from_numpy(load_digits().images.astype(np.uint8)).flatten(1)
    assert sorted(map(bytes, every.numpy())) == sorted(map(bytes, original.numpy()))


def pairs(images: torch.Tensor, labels) -> list[tuple[bytes, int]]:
    return sorted(zip(map(bytes, images.flatten(1).numpy()), (int(v) for v in labels), strict=True))


def test_digits_labels_follow_their_images():
    """Each split's labels are sklearn's targets of its images, and batches carry them."""
    dm = DigitsDataModule(batch_size=50)
    dm.setup()
    assert dm.num_classes == 10
    digits = load_digits()
    expected = pairs(torch.from_numpy(digits.images.astype(np.uint8)), digits.target)
    got = []
    for split in ("train", "val", "test"):
        assert dm.labels[split].dtype == torch.int64 and len(dm.labels[split]) == len(dm.splits[split])
        got += pairs(dm.splits[split], dm.labels[split])
    assert sorted(got) == expected
    batch = next(iter(dm.val_dataloader()))
    assert batch["label"].dtype == torch.int64
    assert torch.equal(batch["label"], dm.labels["val"][batch["index"]])
    assert sorted(set(dm.labels["train"].tolist())) == list(range(10))
    head = dm.head("test", 3)
    assert torch.equal(head["levels"], dm.splits["test"][:3]) and torch.equal(
        head["label"], dm.labels["test"][:3]
    )


def test_persistent_workers_only_with_workers():
    dm = DigitsDataModule(num_workers=2)
    dm.setup("fit")
    assert dm.train_dataloader().persistent_workers  # built, not iterated: no worker starts


@pytest.mark.parametrize(
    ("cls", "key", "value"),
    [
        (DigitsDataModule, "num_levels", 256),
        (BinarizedMNISTDataModule, "num_levels", 256),
        (BinarizedMNISTDataModule, "image_size", 32),
        (MNISTDataModule, "num_channels", 3),
        (CIFAR10DataModule, "num_channels", 1),
        (CIFAR10DataModule, "image_size", 28),
        (DigitsDataModule, "num_classes", 0),
        (BinarizedMNISTDataModule, "num_classes", 10),
        (MNISTDataModule, "num_classes", 100),
    ],
)
def test_declared_facts_must_match(cls, key, value):
    with pytest.raises(ValueError, match=rf"data\.{key}={value} does not match .*: set data\.{key}=\d+$"):
        cls(**{key: value})


@pytest.mark.parametrize(
    "name", ["digits", "binarized_mnist", "mnist", "cifar10", "imagenet32", "imagenet64"]
)
def test_configs_instantiate(name):
    """Each conf/data/<name>.yaml builds its module (touching no files), and the declared facts agree."""
    conf = OmegaConf.load(Path(__file__).parents[1] / "conf" / "data" / f"{name}.yaml")
    dm = instantiate(conf)
    assert (dm.num_channels, dm.num_levels, dm.image_size, dm.num_classes) == (
        conf.num_channels,
        conf.num_levels,
        conf.image_size,
        conf.num_classes,
    )
    # Plain scalars only, so a checkpoint's stored data config can be validated and mapped back.
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in conf.values())


# ---------------------------------------------------------------- binarized MNIST


def write_amat(path, images: np.ndarray) -> None:
    with open(path, "w") as f:
        for image in images:
            f.write(" ".join(str(v) for v in image.reshape(-1)) + "\n")


def binary_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, size=(n, 28, 28), dtype=np.uint8)


@pytest.fixture
def no_network(monkeypatch):
    """Every download writes half a file, then fails, as an interrupted transfer would."""
    calls = []

    def fail(url, path):
        calls.append(url)
        with open(path, "wb") as f:
            f.write(b"0 1 0")
        raise OSError("network is unreachable")

    monkeypatch.setattr(bm, "download_file", fail)
    return calls


def test_binarized_mnist_without_test_file(tmp_path, no_network):
    folder = tmp_path / "binarized_mnist"
    folder.mkdir()
    train, valid = binary_images(7, 0), binary_images(5, 1)
    write_amat(folder / "binarized_mnist_train.amat", train)
    write_amat(folder / "binarized_mnist_valid.amat", valid)

    dm = BinarizedMNISTDataModule(data_dir=str(tmp_path), batch_size=2)
    dm.prepare_data()  # only the optional test file is fetched, and its failure is no error
    assert len(no_network) == 1 and no_network[0].endswith("binarized_mnist_test.amat")
    assert tree(tmp_path) == [
        "binarized_mnist",
        *(f"binarized_mnist/binarized_mnist_{s}.amat" for s in ("train", "valid")),
    ]
    assert not dm.has_test_split()

    dm.setup("fit")
    levels, index, sizes = collect(dm.val_dataloader())
    assert levels.dtype == torch.uint8 and levels.shape == (5, 1, 28, 28)
    assert torch.equal(levels[:, 0], torch.from_numpy(valid)) and torch.equal(index, torch.arange(5))
    assert sizes == [2, 2, 1]
    levels, index, _ = collect(dm.train_dataloader())
    assert torch.equal(levels[:, 0], torch.from_numpy(train)[index])
    assert sorted(index.tolist()) == list(range(7))
    with pytest.raises(FileNotFoundError, match=r"binarized_mnist_test\.amat in .*binarized_mnist"):
        dm.setup("test")

    write_amat(folder / "binarized_mnist_test.amat", binary_images(3, 2))
    assert dm.has_test_split()
    dm.setup("test")
    levels, index, _ = collect(dm.test_dataloader())
    assert levels.shape == (3, 1, 28, 28) and torch.equal(index, torch.arange(3))


def test_binarized_mnist_downloads_atomically(tmp_path, monkeypatch):
    images = {name: binary_images(2, i) for i, name in enumerate(("train", "valid", "test"))}

    def fake_download(url, path):
        assert os.path.dirname(path) != str(tmp_path / "data" / "binarized_mnist"), (
            "never straight into place"
        )
        write_amat(path, images[url.rsplit("_", 1)[1].split(".")[0]])

    monkeypatch.setattr(bm, "download_file", fake_download)
    dm = BinarizedMNISTDataModule(data_dir=str(tmp_path / "data"), batch_size=2)
    dm.prepare_data()
    assert tree(tmp_path / "data") == [
        "binarized_mnist",
        *(f"binarized_mnist/binarized_mnist_{s}.amat" for s in ("test", "train", "valid")),
    ]
    dm.setup()
    assert dm.has_test_split() and torch.equal(dm.splits["test"][:, 0], torch.from_numpy(images["test"]))


@pytest.mark.parametrize("existing", [False, True])
def test_binarized_mnist_missing_and_offline(tmp_path, no_network, existing):
    data_dir = tmp_path / "data"
    if existing:
        data_dir.mkdir()
    dm = BinarizedMNISTDataModule(data_dir=str(data_dir))
    message = (
        r"^binarized MNIST not found: put binarized_mnist_train\.amat, binarized_mnist_valid\.amat in "
        + re.escape(f"{data_dir}/binarized_mnist")
        + r" \(download failed: network is unreachable\)$"
    )
    with pytest.raises(FileNotFoundError, match=message):
        dm.prepare_data()
    assert tree(tmp_path) == (["data"] if existing else []), "nothing half-written is left"


def test_binarized_mnist_read_only_folder_is_left_alone(tmp_path, no_network):
    folder = tmp_path / "binarized_mnist"
    folder.mkdir()
    write_amat(folder / "binarized_mnist_train.amat", binary_images(3, 0))
    write_amat(folder / "binarized_mnist_valid.amat", binary_images(2, 1))
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        dm = BinarizedMNISTDataModule(data_dir=str(tmp_path), batch_size=2)
        dm.prepare_data()  # even as root, a folder nobody may write gets no temporary files
        assert no_network == []
        dm.setup("fit")
        assert len(dm.splits["train"]) == 3 and not dm.has_test_split()
    finally:
        folder.chmod(stat.S_IRWXU)
    assert sorted(os.listdir(folder)) == ["binarized_mnist_train.amat", "binarized_mnist_valid.amat"]


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (lambda lines: lines[2].rsplit(" ", 1)[0], r"line 3: 783 values, expected 784"),
        (lambda lines: "2" + lines[2][1:], r"line 3: unexpected character '2'"),
        (lambda lines: lines[2] + " 1", r"line 3: 785 values"),
        (lambda lines: "01" + lines[2][3:], r"line 3: values must be single 0/1"),
    ],
)
def test_binarized_mnist_corrupt_file(tmp_path, edit, error):
    folder = tmp_path / "binarized_mnist"
    folder.mkdir()
    write_amat(folder / "binarized_mnist_train.amat", binary_images(4, 0))
    path = folder / "binarized_mnist_valid.amat"
    write_amat(path, binary_images(4, 1))
    lines = path.read_text().splitlines()
    lines[2] = edit(lines)
    path.write_text("\n".join(lines) + "\n")
    dm = BinarizedMNISTDataModule(data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"binarized_mnist_valid\.amat " + error):
        dm.setup("fit")


def test_binarized_mnist_any_spacing(tmp_path):
    """Windows line ends, runs of spaces or tabs and a trailing blank line read like the official layout."""
    images = binary_images(3, 0)
    lines = ["  ".join(str(v) for v in image.reshape(-1)) + " \t\r\n" for image in images]
    path = tmp_path / "odd.amat"
    path.write_text("".join(lines) + "\r\n")
    assert np.array_equal(bm.read_amat(str(path)), images.reshape(3, -1))


def test_binarized_mnist_rejects_a_broken_download(tmp_path, monkeypatch):
    def error_page(url, path):
        with open(path, "w") as f:
            f.write("<html>moved</html>\n")

    monkeypatch.setattr(bm, "download_file", error_page)
    dm = BinarizedMNISTDataModule(data_dir=str(tmp_path / "data"))
    with pytest.raises(
        FileNotFoundError, match=r"download failed: .*binarized_mnist_train\.amat line 1: .*'<'"
    ):
        dm.prepare_data()
    assert tree(tmp_path) == []


def test_binarized_mnist_error_comes_before_training(tmp_path, no_network):
    """Lightning calls prepare_data before fit: the missing data stops the run before any step."""

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, batch_idx):
            raise AssertionError("training started")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=str(tmp_path / "run"),
    )
    with pytest.raises(FileNotFoundError, match="binarized MNIST not found"):
        trainer.fit(Model(), datamodule=BinarizedMNISTDataModule(data_dir=str(tmp_path / "data")))
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------- MNIST and CIFAR-10


def write_idx(folder, prefix: str, images: np.ndarray) -> None:
    """The IDX format of the official files: big-endian magic (2051 images, 2049 labels) and sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(images)
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes()
    )
    labels = bytes(class_of(n))
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels)


def class_of(n: int) -> list[int]:
    """The labels the test files carry: 7, 4, 1, 8, ... (all ten classes, not in order)."""
    return [(7 * i + 7) % 10 for i in range(n)]


def grey_images(n: int, shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def test_mnist_from_idx_files(tmp_path, monkeypatch):
    train, test = grey_images(12, (28, 28), 0), grey_images(3, (28, 28), 1)
    write_idx(tmp_path / "MNIST" / "raw", "train", train)
    write_idx(tmp_path / "MNIST" / "raw", "t10k", test)
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", lambda self: pytest.fail("downloaded"))

    dm = MNISTDataModule(data_dir=str(tmp_path), batch_size=5, val_size=4)
    dm.prepare_data()  # the files are there: no download
    dm.setup("fit")
    dm.setup("test")
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 8, "val": 4, "test": 3}
    levels, index, sizes = collect(dm.test_dataloader())
    assert levels.dtype == torch.uint8 and levels.shape == (3, 1, 28, 28)
    assert torch.equal(levels[:, 0], torch.from_numpy(test)) and torch.equal(index, torch.arange(3))
    assert dm.labels["test"].tolist() == class_of(3)
    # Train and val partition the official training images, the same way on every run, labels with them.
    seen = torch.cat([dm.splits["train"], dm.splits["val"]])[:, 0]
    assert sorted(map(bytes, seen.numpy())) == sorted(map(bytes, train))
    seen_labels = torch.cat([dm.labels["train"], dm.labels["val"]])
    assert pairs(seen, seen_labels) == pairs(torch.from_numpy(train), class_of(12))
    again = MNISTDataModule(data_dir=str(tmp_path), val_size=4)
    again.setup("fit")
    assert torch.equal(again.splits["val"], dm.splits["val"])
    assert int(dm.splits["train"].max()) > 200, "raw 8-bit levels, not normalised"


def test_mnist_download_moves_complete_files_into_place(tmp_path, monkeypatch):
    def fake_download(self):
        write_idx(Path(self.raw_folder), "train", grey_images(2, (28, 28), 0))
        write_idx(Path(self.raw_folder), "t10k", grey_images(2, (28, 28), 1))

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", fake_download)
    MNISTDataModule(data_dir=str(tmp_path / "data")).prepare_data()
    assert tree(tmp_path / "data") == ["MNIST", "MNIST/raw"] + [
        f"MNIST/raw/{f}" for f in sorted(MNISTDataModule.files)
    ]


def write_cifar(folder, batches: list[np.ndarray], test: np.ndarray) -> None:
    """The python-pickle layout of cifar-10-python.tar.gz: dicts with 'data' uint8 (N, 3072) and 'labels'."""
    folder.mkdir(parents=True)
    for name, images in [*((f"data_batch_{i + 1}", b) for i, b in enumerate(batches)), ("test_batch", test)]:
        entry = {
            "batch_label": name,
            "labels": class_of(len(images)),
            "data": images.reshape(len(images), -1),
            "filenames": [f"{i}.png" for i in range(len(images))],
        }
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))


def test_cifar10_from_pickled_batches(tmp_path, monkeypatch):
    batches = [grey_images(2, (3, 32, 32), i) for i in range(5)]
    test = grey_images(3, (3, 32, 32), 9)
    write_cifar(tmp_path / "cifar-10-batches-py", batches, test)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", lambda self: pytest.fail("downloaded"))

    dm = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=4, val_size=3)
    dm.prepare_data()
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 7, "val": 3, "test": 3}
    levels, index, sizes = collect(dm.test_dataloader())
    assert levels.shape == (3, 3, 32, 32) and levels.dtype == torch.uint8
    assert torch.equal(levels, torch.from_numpy(test)), "channels-first, pixel for pixel"
    assert torch.equal(index, torch.arange(3))
    levels, index, sizes = collect(dm.val_dataloader())
    assert sizes == [3] and torch.equal(index, torch.arange(3))
    seen = torch.cat([dm.splits["train"], dm.splits["val"]])
    assert sorted(map(bytes, seen.numpy())) == sorted(map(bytes, np.concatenate(batches)))
    seen_labels = torch.cat([dm.labels["train"], dm.labels["val"]])
    assert pairs(seen, seen_labels) == pairs(torch.from_numpy(np.concatenate(batches)), class_of(2) * 5)
    assert dm.labels["test"].tolist() == class_of(3)
    assert next(iter(dm.test_dataloader()))["label"].tolist() == class_of(3)


def test_cifar10_from_a_hand_fetched_archive(tmp_path, monkeypatch):
    """cifar-10-python.tar.gz in data_dir is unpacked without any network."""
    write_cifar(
        tmp_path / "src" / "cifar-10-batches-py",
        [grey_images(1, (3, 32, 32), i) for i in range(5)],
        grey_images(2, (3, 32, 32), 9),
    )
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(data_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", lambda self: pytest.fail("downloaded"))

    dm = CIFAR10DataModule(data_dir=str(data_dir), val_size=1)
    dm.prepare_data()
    assert sorted(os.listdir(data_dir / "cifar-10-batches-py")) == sorted(CIFAR10DataModule.files)
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 4, "val": 1, "test": 2}


@pytest.mark.parametrize("cls", [MNISTDataModule, CIFAR10DataModule])
def test_torchvision_missing_and_offline(cls, tmp_path, monkeypatch):
    dataset = torchvision.datasets.MNIST if cls is MNISTDataModule else torchvision.datasets.CIFAR10

    def fail(self):
        # As torchvision does offline: it creates its folders and a partial archive, then gives up.
        folder = getattr(self, "raw_folder", self.root)
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, "partial.gz"), "wb").close()
        raise RuntimeError("Error downloading:\nTried https://example, got:\n<urlopen error no network>")

    monkeypatch.setattr(dataset, "download", fail)
    data_dir = tmp_path / "data"
    dm = cls(data_dir=str(data_dir))
    folder = os.path.join(str(data_dir), cls.folder)
    first = cls.files[0]
    with pytest.raises(
        FileNotFoundError,
        match=rf"^{cls.name} not found: put {first}, .* in {re.escape(folder)}(, or .*)? "
        r"\(download failed: .*no network>\)$",
    ):
        dm.prepare_data()
    assert tree(tmp_path) == []
    with pytest.raises(FileNotFoundError, match=f"{cls.name} not found"):
        dm.setup("fit")
