"""data=image_folder on folders of PNG / JPEG files written here."""

import logging
import os
import stat

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

import datamodules.image_folder as image_folder
from datamodules import ImageFolderDataModule
from pixel_models.training.builders import build

CONF = os.path.join(os.path.dirname(__file__), "..", "conf", "data", "image_folder.yaml")


def random_rgb(size, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


def save(path, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def classes_folder(root, per_class=(4, 3, 5), size=8) -> dict:
    """Class folders b_cats, a_dogs, c_owls (labelled by sorted name) of exact-size PNGs; name -> array."""
    written = {}
    for c, (name, count) in enumerate(zip(("b_cats", "a_dogs", "c_owls"), per_class, strict=True)):
        for i in range(count):
            relative = os.path.join(name, f"{i}.png")
            written[relative] = random_rgb((size, size), seed=10 * c + i)
            save(os.path.join(root, relative), written[relative])
    return written


def everything(dm) -> list:
    """(image bytes, label) of every image of every split."""
    out = []
    for split, levels in dm.splits.items():
        labels = dm.labels.get(split, [None] * len(levels))
        out += [
            (bytes(x.numpy().tobytes()), None if y is None else int(y))
            for x, y in zip(levels, labels, strict=True)
        ]
    return sorted(out, key=repr)


def test_classes_labels_levels_and_splits(tmp_path):
    written = classes_folder(tmp_path)
    with pytest.raises(ValueError, match=r"data\.num_classes=0 does not match .*a_dogs, b_cats, c_owls.*=3$"):
        ImageFolderDataModule(path=str(tmp_path), image_size=8)
    dm = ImageFolderDataModule(
        path=str(tmp_path), image_size=8, num_classes=3, val_fraction=0.25, test_fraction=0.25, batch_size=4
    )
    assert dm.classes == ["a_dogs", "b_cats", "c_owls"]
    dm.prepare_data()
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 6, "val": 3, "test": 3}
    label_of = {"a_dogs": 0, "b_cats": 1, "c_owls": 2}
    # An exact-size image at K=256 is its own pixels, channels first, with its folder's label.
    expected = sorted(
        ((a.transpose(2, 0, 1).tobytes(), label_of[name.split(os.sep)[0]]) for name, a in written.items()),
        key=repr,
    )
    assert everything(dm) == expected
    batch = next(iter(dm.train_dataloader()))
    assert batch["levels"].dtype == torch.uint8 and batch["levels"].shape == (4, 3, 8, 8)
    assert torch.equal(batch["label"], dm.labels["train"][batch["index"]])

    again = ImageFolderDataModule(
        path=str(tmp_path), image_size=8, num_classes=3, val_fraction=0.25, test_fraction=0.25
    )
    again.setup()
    assert all(torch.equal(again.splits[s], dm.splits[s]) for s in dm.splits), "the same split every run"


def test_flat_folder_grey_quantized_and_binarized(tmp_path):
    rng = np.random.default_rng(0)
    grey = [rng.integers(0, 256, size=(6, 6), dtype=np.uint8) for _ in range(10)]
    for i, g in enumerate(grey):
        save(str(tmp_path / f"img{i:02d}.png"), g)
    values = np.stack(grey)

    def levels(**kw):
        dm = ImageFolderDataModule(path=str(tmp_path), image_size=6, num_channels=1, test_fraction=0, **kw)
        dm.setup()
        assert not dm.labels and dm.num_classes == 0 and not dm.has_test_split()
        assert "label" not in next(iter(dm.val_dataloader()))
        return sorted(bytes(x.numpy().tobytes()) for s in ("train", "val") for x in dm.splits[s])

    assert levels() == sorted(bytes(v[None].tobytes()) for v in values)
    assert levels(num_levels=8) == sorted(bytes((v[None] >> 5).tobytes()) for v in values), (
        "3-bit: top 3 bits"
    )
    binary = [(v[None] / 255.0 >= 0.3).astype(np.uint8) for v in values]
    assert levels(num_levels=2, threshold=0.3) == sorted(bytes(b.tobytes()) for b in binary)


def test_centre_crop_and_resize(tmp_path):
    """A 40x20 image: the centre 20x20 is kept and shrunk 2x by averaging 2x2 blocks (box filter)."""
    wide = random_rgb((40, 20), seed=3)
    save(str(tmp_path / "wide.png"), wide)
    save(str(tmp_path / "other.png"), random_rgb((10, 10), seed=4))
    save(str(tmp_path / "third.png"), random_rgb((10, 10), seed=5))
    dm = ImageFolderDataModule(path=str(tmp_path), image_size=10, val_fraction=0.3, test_fraction=0)
    levels, _ = dm.load()
    centre = wide[:, 10:30].astype(np.float64)
    blocks = centre.reshape(10, 2, 10, 2, 3).mean(axis=(1, 3)).transpose(2, 0, 1)
    got = levels[[name for name, _ in dm.files].index("wide.png")].astype(np.float64)
    assert np.abs(got - blocks).max() <= 1.0  # rounding only
    # Enlarging works too (bicubic), and a JPEG reads like a PNG.
    Image.fromarray(random_rgb((5, 7), seed=6)).save(tmp_path / "small.jpg", quality=95)
    dm = ImageFolderDataModule(path=str(tmp_path), image_size=10, val_fraction=0.3, test_fraction=0)
    assert dm.load()[0].shape == (4, 3, 10, 10)


def test_cache_reused_and_rebuilt_when_the_folder_changes(tmp_path, monkeypatch):
    written = classes_folder(tmp_path / "imgs")
    kwargs = dict(path=str(tmp_path / "imgs"), image_size=8, num_classes=3)
    ImageFolderDataModule(**kwargs).prepare_data()
    cache = tmp_path / "imgs" / ".pixel_models_cache"
    assert os.listdir(cache) == ["s8-c3-k256.npz"]

    decoded = []
    original = image_folder.load_image
    monkeypatch.setattr(image_folder, "load_image", lambda *a: (decoded.append(a[0]), original(*a))[1])
    ImageFolderDataModule(**kwargs).setup()
    assert decoded == [], "an unchanged folder is not decoded again"

    # A changed file (new pixels, new size and time), then an added one: rebuilt each time, with the change.
    changed = random_rgb((8, 8), seed=77)
    save(str(tmp_path / "imgs" / "a_dogs" / "0.png"), changed)
    os.utime(tmp_path / "imgs" / "a_dogs" / "0.png", ns=(1, 1))
    dm = ImageFolderDataModule(**kwargs)
    dm.setup()
    assert len(decoded) == 12
    assert changed.transpose(2, 0, 1).tobytes() in {b for b, _ in everything(dm)}
    save(str(tmp_path / "imgs" / "c_owls" / "new.png"), random_rgb((8, 8), seed=78))
    dm = ImageFolderDataModule(**kwargs)
    dm.setup()
    assert len(decoded) == 25 and sum(len(v) for v in dm.splits.values()) == 13
    # Other settings are another cache file, next to the first.
    ImageFolderDataModule(**kwargs, num_levels=8).prepare_data()
    assert sorted(os.listdir(cache)) == ["s8-c3-k256.npz", "s8-c3-k8.npz"]
    del written


def test_cache_written_atomically(tmp_path, monkeypatch):
    classes_folder(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ImageFolderDataModule(path=str(tmp_path), image_size=8, num_classes=3).prepare_data()
    assert os.listdir(tmp_path / ".pixel_models_cache") == [], "no partial cache"
    monkeypatch.undo()

    dm = ImageFolderDataModule(path=str(tmp_path), image_size=8, num_classes=3)
    dm.prepare_data()
    # A cache cut short (a crash mid-copy, a full disk elsewhere) is rebuilt, not trusted.
    path = tmp_path / ".pixel_models_cache" / "s8-c3-k256.npz"
    path.write_bytes(path.read_bytes()[:-300])
    dm = ImageFolderDataModule(path=str(tmp_path), image_size=8, num_classes=3)
    dm.setup()
    assert sum(len(v) for v in dm.splits.values()) == 12


def test_unreadable_files_are_listed_and_skipped(tmp_path, caplog):
    classes_folder(tmp_path)
    (tmp_path / "a_dogs" / "junk.png").write_bytes(b"not an image at all")
    good = (tmp_path / "b_cats" / "0.png").read_bytes()
    (tmp_path / "b_cats" / "cut.png").write_bytes(good[: len(good) // 2])
    kwargs = dict(path=str(tmp_path), image_size=8, num_classes=3)
    with caplog.at_level(logging.WARNING):
        dm = ImageFolderDataModule(**kwargs)
        dm.setup()
    assert sum(len(v) for v in dm.splits.values()) == 12
    message = caplog.text
    assert (
        "2 of 14 files" in message and "junk.png" in message and "cut.png" in message and "skipped" in message
    )
    # strict refuses, also when the folder is already cached.
    with pytest.raises(ValueError, match=r"2 of 14 files .* unreadable: .*junk\.png.*data\.strict=true"):
        ImageFolderDataModule(**kwargs, strict=True).prepare_data()


@pytest.mark.parametrize(
    ("build", "kwargs", "error"),
    [
        (lambda p: None, {}, r"holds no PNG or JPEG images"),
        (lambda p: (p / "notes.txt").write_text("hi"), {}, r"holds no PNG or JPEG images"),
        (
            lambda p: [save(str(p / f"{i}.png"), random_rgb((4, 4), i)) for i in range(2)],
            {},
            r"2 readable images are too few to split into train / val / test .*at least 3",
        ),
        (
            lambda p: (
                save(str(p / "top.png"), random_rgb((4, 4), 0)),
                save(str(p / "c" / "1.png"), random_rgb((4, 4), 1)),
            ),
            {},
            r"both image files \(top\.png, \.\.\.\) and class subfolders \(c, \.\.\.\)",
        ),
        (lambda p: None, {"num_channels": 2}, r"data\.num_channels=2 must be 1 \(grey\) or 3"),
        (lambda p: None, {"num_levels": 300}, r"data\.num_levels=300 must be between 2 and 256"),
        (lambda p: None, {"val_fraction": 0.0}, r"data\.val_fraction=0\.0 and data\.test_fraction"),
    ],
)
def test_bad_folders_and_settings(tmp_path, build, kwargs, error):
    build(tmp_path)
    with pytest.raises(ValueError, match=error):
        ImageFolderDataModule(path=str(tmp_path), image_size=4, **kwargs)


def test_unreadable_files_leave_too_few(tmp_path):
    for i in range(2):
        save(str(tmp_path / f"{i}.png"), random_rgb((4, 4), i))
    (tmp_path / "2.png").write_bytes(b"junk")
    dm = ImageFolderDataModule(path=str(tmp_path), image_size=4)  # three files: enough, until one fails
    with pytest.raises(ValueError, match=r"2 readable images are too few"):
        dm.setup()


def test_missing_path_and_read_only_folder(tmp_path):
    with pytest.raises(ValueError, match=r"data\.path is not set"):
        build(OmegaConf.load(CONF))
    with pytest.raises(FileNotFoundError, match=r"data\.path=.*nowhere: no such folder"):
        ImageFolderDataModule(path=str(tmp_path / "nowhere"))
    classes_folder(tmp_path / "imgs")
    folder = tmp_path / "imgs"
    mode = stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
    folder.chmod(mode)
    try:
        with pytest.raises(PermissionError, match=r"is not writable.*data\.cache_dir="):
            ImageFolderDataModule(path=str(folder), image_size=8, num_classes=3).prepare_data()
        dm = ImageFolderDataModule(
            path=str(folder), image_size=8, num_classes=3, cache_dir=str(tmp_path / "c")
        )
        dm.setup()
        (name,) = os.listdir(tmp_path / "c")
        assert name.startswith("imgs-") and name.endswith("-s8-c3-k256.npz")
        assert sorted(os.listdir(folder)) == ["a_dogs", "b_cats", "c_owls"], "the folder is left untouched"
    finally:
        folder.chmod(stat.S_IRWXU)


def test_config_instantiates_with_a_path(tmp_path):
    classes_folder(tmp_path)
    conf = OmegaConf.load(CONF)
    conf.path, conf.image_size, conf.num_classes = str(tmp_path), 8, 3
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in conf.values())
    dm = instantiate(conf)
    assert (dm.num_channels, dm.num_levels, dm.image_size, dm.num_classes) == (3, 256, 8, 3)
