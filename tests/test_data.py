"""Tests for aebnas/data/datasets.py and aebnas/data/batches.py: loaders read the real on-disk formats; batches are exact."""

import hashlib
import pickle
import urllib.error
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets as tvd

from aebnas.data.batches import BatchLoader, calibration_loader
import aebnas.data.datasets as data_module
from aebnas.data.datasets import DATASET_NAMES, Dataset, DatasetNotFoundError, embedded_dataset_path, load_dataset


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def _tagged_images(n, seed, channels=3, size=32):
    """Random NCHW uint8 images whose pixel (c=0, h=0, w=0) holds the image's index."""
    x = np.random.default_rng(seed).integers(0, 256, (n, channels, size, size), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(n)
    return x


def _assert_train_val_are(data, x_written, y_written):
    """train ∪ val is exactly the written training set, each image with its own label."""
    x = np.concatenate([data.x_train, data.x_val])
    y = np.concatenate([data.y_train, data.y_val])
    tags = x[:, 0, 0, 0].astype(np.int64)
    assert sorted(tags.tolist()) == list(range(len(x_written)))
    assert np.array_equal(x, x_written[tags])
    assert np.array_equal(y, np.asarray(y_written, dtype=np.int64)[tags])


def _pickle(path, obj):
    # The real files were pickled by Python 2 with str keys; torchvision reads them with
    # encoding="latin1", which turns those keys into str, so str keys match the real format.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


# --------------------------------------------------------------------------- torchvision formats


def test_cifar10_real_format(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    x_train, x_test = _tagged_images(20, seed=1), _tagged_images(6, seed=2)
    y_train, y_test = [i % 10 for i in range(20)], [9, 8, 7, 6, 5, 4]
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for b in range(5):
        rows = slice(4 * b, 4 * b + 4)
        _pickle(folder / f"data_batch_{b + 1}", {"data": x_train[rows].reshape(4, 3072), "labels": y_train[rows]})
    _pickle(folder / "test_batch", {"data": x_test.reshape(6, 3072), "labels": y_test})
    _pickle(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": 4})
    train_list = [[f"data_batch_{b}", _md5(folder / f"data_batch_{b}")] for b in range(1, 6)]
    monkeypatch.setattr(tvd.CIFAR10, "train_list", train_list)
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(tvd.CIFAR10, "meta", {**tvd.CIFAR10.meta, "md5": _md5(folder / "batches.meta")})

    data = load_dataset("cifar10", data_dir=tmp_path, val_size=4)

    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (16, 4, 6)
    assert data.x_train.shape == (16, 3, 32, 32) and data.x_train.dtype == np.uint8
    assert data.x_train.flags.c_contiguous and data.y_train.dtype == np.int64
    _assert_train_val_are(data, x_train, y_train)
    assert np.array_equal(data.x_test, x_test)
    assert data.y_test.tolist() == y_test
    # a pixel of the row-major planes: image 3, green plane, row 5, column 7
    assert data.x_test[3, 1, 5, 7] == x_test.reshape(6, 3072)[3, 1024 + 5 * 32 + 7]
    assert data.classes == names and data.num_classes == 10 and data.in_channels == 3
    assert data.hflip is True
    assert data.summary() == "cifar10: 16 train / 4 val / 6 test, 10 classes, images 3x32x32"
    with pytest.raises(ValueError, match="val_size=5000"):
        load_dataset("cifar10", data_dir=tmp_path)  # the default 5000 does not fit 20 images


def test_cifar100_real_format(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x_train, x_test = _tagged_images(12, seed=3), _tagged_images(5, seed=4)
    y_train, y_test = [99, 0, 50, 7, 3, 3, 12, 64, 1, 2, 98, 42], [0, 99, 5, 6, 7]
    names = [f"class{i}" for i in range(100)]
    _pickle(folder / "train", {"data": x_train.reshape(12, 3072), "fine_labels": y_train, "coarse_labels": [0] * 12})
    _pickle(folder / "test", {"data": x_test.reshape(5, 3072), "fine_labels": y_test, "coarse_labels": [0] * 5})
    _pickle(folder / "meta", {"fine_label_names": names, "coarse_label_names": ["c"] * 20})
    monkeypatch.setattr(tvd.CIFAR100, "train_list", [["train", _md5(folder / "train")]])
    monkeypatch.setattr(tvd.CIFAR100, "test_list", [["test", _md5(folder / "test")]])
    monkeypatch.setattr(tvd.CIFAR100, "meta", {**tvd.CIFAR100.meta, "md5": _md5(folder / "meta")})

    data = load_dataset("cifar100", data_dir=tmp_path, val_size=2, seed=5)

    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (10, 2, 5)
    _assert_train_val_are(data, x_train, y_train)
    assert np.array_equal(data.x_test, x_test) and data.y_test.tolist() == y_test
    assert data.num_classes == 100 and data.classes[99] == "class99"


def test_svhn_real_format(tmp_path, monkeypatch):
    scipy_io = pytest.importorskip("scipy.io")
    x_train, x_test = _tagged_images(10, seed=6), _tagged_images(4, seed=7)
    y_train = np.array([10, 1, 2, 3, 4, 5, 6, 7, 8, 9], dtype=np.uint8)  # SVHN writes digit 0 as 10
    y_test = np.array([10, 10, 3, 9], dtype=np.uint8)
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        # the .mat layout: X (H, W, C, N), y (N, 1)
        scipy_io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x.transpose(2, 3, 1, 0), "y": y[:, None]})
    split_list = {
        split: [url, f, _md5(tmp_path / f) if split != "extra" else md5]
        for split, (url, f, md5) in tvd.SVHN.split_list.items()
    }
    monkeypatch.setattr(tvd.SVHN, "split_list", split_list)

    data = load_dataset("svhn", data_dir=tmp_path, val_size=3)

    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (7, 3, 4)
    assert data.x_test.shape == (4, 3, 32, 32)
    _assert_train_val_are(data, x_train, y_train % 10)
    assert data.y_test.tolist() == [0, 0, 3, 9]
    # pixel X[h=5, w=7, c=2, n=1] of the file is image 1, channel 2, row 5, column 7
    assert data.x_test[1, 2, 5, 7] == x_test.transpose(2, 3, 1, 0)[5, 7, 2, 1]
    assert np.array_equal(data.x_test, x_test)
    assert data.classes == [str(d) for d in range(10)] and data.hflip is False


@pytest.mark.parametrize(
    "name, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("svhn", "")]
)
def test_missing_torchvision_files(tmp_path, name, folder):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(name, data_dir=tmp_path)
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert str(tmp_path / folder) in message and "(missing)" in message
    assert "--download" in message and "--data-dir" in message


def test_corrupted_file_is_reported(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"not cifar")
    with pytest.raises(DatasetNotFoundError, match=r"data_batch_1 \(present, but its md5 checksum differs\)"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_failed_download_says_how_to_get_files(tmp_path, monkeypatch):
    def no_network(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tvd.CIFAR10, "download", no_network)
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar10", data_dir=tmp_path, download=True)
    message = str(err.value)
    assert f"downloading dataset 'cifar10' into {tmp_path} failed" in message and "no network" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message and "--data-dir" in message


# --------------------------------------------------------------------------- embedded subset


@pytest.fixture(scope="module")
def subset():
    return load_dataset("cifar10-subset")


def test_embedded_subset(subset):
    assert embedded_dataset_path().is_file()
    assert len(subset.y_train) + len(subset.y_val) == 3805 and len(subset.y_val) == 500
    assert len(subset.y_test) == 761 and subset.num_classes == 10 and subset.classes[0] == "airplane"
    assert subset.x_train.shape[1:] == (3, 32, 32) and subset.in_channels == 3
    x = subset.x_train / 255.0
    assert np.allclose(subset.mean, x.mean(axis=(0, 2, 3)), atol=1e-9)
    assert np.allclose(subset.std, x.std(axis=(0, 2, 3)), atol=1e-9)


def test_split_follows_the_seed(subset):
    again = load_dataset("cifar10-subset", seed=0)
    other = load_dataset("cifar10-subset", seed=1, val_size=300)
    assert np.array_equal(again.x_val, subset.x_val) and np.array_equal(again.y_train, subset.y_train)
    assert len(other.y_val) == 300 and not np.array_equal(other.x_val[:300], subset.x_val[:300])


@pytest.mark.parametrize("val_size", [0, -1, 3805, 4000])
def test_val_size_out_of_range(val_size):
    with pytest.raises(ValueError, match=rf"val_size={val_size} .*0 < val_size < 3805"):
        load_dataset("cifar10-subset", val_size=val_size)


def test_unknown_name():
    with pytest.raises(ValueError, match="not one of") as err:
        load_dataset("imagenet")
    assert all(name in str(err.value) for name in DATASET_NAMES) and ".npz" in str(err.value)


# --------------------------------------------------------------------------- .npz files


def _npz_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8),
        "y_train": np.arange(30) % 3,
        "x_test": rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8),
        "y_test": np.array([0, 1, 2, 2, 1]),
        "classes": np.array(["cat", "dog", "fox"]),
    }


def test_npz_colour(tmp_path):
    arrays = _npz_arrays()
    np.savez(tmp_path / "pets.npz", **arrays)
    data = load_dataset(str(tmp_path / "pets.npz"))
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (27, 3, 5)  # val: 10%
    assert data.classes == ["cat", "dog", "fox"] and data.num_classes == 3 and data.in_channels == 3
    assert np.array_equal(data.x_test, arrays["x_test"].transpose(0, 3, 1, 2))
    assert data.x_test[2, 1, 4, 6] == arrays["x_test"][2, 4, 6, 1] and data.hflip is True


def test_npz_grayscale_relative_to_data_dir(tmp_path):
    arrays = _npz_arrays()
    arrays = {**arrays, "x_train": arrays["x_train"][..., 0], "x_test": arrays["x_test"][..., 0].astype(np.int32)}
    del arrays["classes"]
    np.savez(tmp_path / "gray.npz", **arrays)
    data = load_dataset("gray.npz", data_dir=tmp_path, val_size=10)
    assert data.in_channels == 1 and data.x_train.shape == (20, 1, 8, 8) and data.x_test.dtype == np.uint8
    assert data.classes == ["0", "1", "2"]
    assert np.array_equal(data.x_test[:, 0], arrays["x_test"].astype(np.uint8))


def _drop(key):
    return lambda a: {k: v for k, v in a.items() if k != key}


def _set(key, value):
    return lambda a: {**a, key: value(a) if callable(value) else value}


@pytest.mark.parametrize(
    "corrupt, key",
    [
        (_drop("y_test"), "y_test"),
        (_set("x_train", lambda a: a["x_train"].astype(np.float32)), "x_train"),
        (_set("x_train", lambda a: a["x_train"].astype(np.int16) + 100), "x_train"),
        (_set("x_train", lambda a: a["x_train"][..., None]), "x_train"),
        (_set("x_train", lambda a: a["x_train"].transpose(0, 3, 1, 2)), "x_train"),
        (_set("x_test", lambda a: a["x_test"][:, :4, :4]), "x_test"),
        (_set("y_train", lambda a: a["y_train"][:-1]), "y_train"),
        (_set("y_train", lambda a: a["y_train"].astype(np.float64)), "y_train"),
        (_set("y_train", lambda a: a["y_train"][:, None]), "y_train"),
        (_set("y_test", np.array([0, 1, -1, 2, 1])), "y_test"),
        (_set("y_train", lambda a: np.where(a["y_train"] == 2, 3, a["y_train"])), "y_train"),
        (_set("classes", np.array([["cat", "dog", "fox"]])), "classes"),
    ],
)
def test_npz_invalid(tmp_path, corrupt, key):
    path = tmp_path / "bad.npz"
    np.savez(path, **corrupt(_npz_arrays()))
    with pytest.raises(ValueError) as err:
        load_dataset(str(path))
    assert str(path) in str(err.value) and key in str(err.value)


def _unnamed(arrays, y_train, y_test):
    """``arrays`` without a classes key, with these labels."""
    arrays = {k: v for k, v in arrays.items() if k != "classes"}
    return {**arrays, "y_train": np.asarray(y_train), "y_test": np.asarray(y_test)}


def test_npz_one_based_labels_are_refused(tmp_path):
    path = tmp_path / "one_based.npz"
    np.savez(path, **_unnamed(_npz_arrays(), np.arange(30) % 3 + 1, [1, 2, 3, 3, 2]))  # e.g. SVHN's 1..10
    with pytest.raises(ValueError) as err:
        load_dataset(str(path))
    message = str(err.value)
    assert str(path) in message and "y_train never uses label(s) 0 of 0..3" in message
    assert "labels look 1-based: subtract 1" in message and "'classes' key" in message


def test_npz_label_gap_is_refused(tmp_path):
    path = tmp_path / "gap.npz"
    np.savez(path, **_unnamed(_npz_arrays(), np.arange(30) % 3 * 2, [0, 2, 4, 4, 6]))  # 0, 2, 4 (6: test only)
    with pytest.raises(ValueError) as err:
        load_dataset(str(path))
    message = str(err.value)
    assert str(path) in message and "y_train never uses label(s) 1, 3, 5, 6 of 0..6" in message
    assert "1-based" not in message and "'classes' key naming every class" in message


def test_npz_unused_labels_are_allowed_when_classes_names_them(tmp_path):
    arrays = _unnamed(_npz_arrays(), np.arange(30) % 3 + 1, [1, 2, 3, 3, 2])
    np.savez(tmp_path / "named.npz", **arrays, classes=np.array(["none", "cat", "dog", "fox"]))
    data = load_dataset(str(tmp_path / "named.npz"))
    assert data.num_classes == 4 and data.classes[0] == "none"
    assert sorted(set(np.concatenate([data.y_train, data.y_val]).tolist())) == [1, 2, 3]


def test_npz_missing_file(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("nowhere.npz", data_dir=tmp_path)
    assert str(tmp_path / "nowhere.npz") in str(err.value) and "download" in str(err.value)


# --------------------------------------------------------------------------- BatchLoader


def _images(n, seed=0, size=32):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _loader(x, **kw):
    kw = {"batch_size": 4, "resolution": x.shape[-1], "mean": (0, 0, 0), "std": (1, 1, 1), "train": True, **kw}
    return BatchLoader(x, torch.arange(len(x)), **kw)


def _pixels(batch):
    """Undo /255 of a loader built with mean 0, std 1: back to exact uint8 values."""
    restored = batch * 255
    assert torch.allclose(restored, restored.round(), atol=1e-3)
    return restored.round().to(torch.uint8)


def test_shapes_and_dtypes_at_resolution_40():
    images, labels = next(iter(_loader(_images(10), resolution=40)))
    assert images.shape == (4, 3, 40, 40) and images.dtype == torch.float32
    assert labels.shape == (4,) and labels.dtype == torch.int64


@pytest.mark.parametrize("resolution", [32, 40])
def test_eval_returns_normalised_pixels_in_order(resolution):
    x = _images(10)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
    loader = BatchLoader(x, torch.arange(10) * 2, batch_size=4, resolution=resolution, mean=mean, std=std, train=False)
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [4, 4, 2] and len(loader) == 3
    expected = (x.double() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    if resolution != 32:
        expected = F.interpolate(expected.float(), size=(resolution, resolution), mode="bilinear", align_corners=False)
    assert torch.allclose(torch.cat([b[0] for b in batches]), expected.float(), atol=1e-5)
    assert torch.cat([b[1] for b in batches]).tolist() == list(range(0, 20, 2))


def test_train_is_seeded_and_reshuffles_every_epoch():
    x = _images(40)

    def epochs(loader, n=2):
        return [torch.cat([lab for _, lab in loader]) for _ in range(n)]

    first, second = epochs(_loader(x, seed=3)), epochs(_loader(x, seed=3))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], epochs(_loader(x, seed=4), 1)[0])
    assert sorted(first[0].tolist()) == list(range(40))  # 40 % 4 == 0: every sample once
    replay = _loader(x, seed=3)
    replay.set_epoch(1)
    assert torch.equal(torch.cat([lab for _, lab in replay]), first[1])
    a, b = next(iter(_loader(x, seed=3))), next(iter(_loader(x, seed=3)))
    assert torch.equal(a[0], b[0])


def test_train_crops_are_shifts_of_the_padded_image():
    x = _images(16)
    images, labels = next(iter(_loader(x, batch_size=16, crop_padding=4, seed=1)))
    found = []
    for image, label in zip(_pixels(images), labels):
        padded = F.pad(x[label], (4, 4, 4, 4))
        matches = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if torch.equal(image, (padded.flip(-1) if flip else padded)[:, dy : dy + 32, dx : dx + 32])
        ]
        assert len(matches) == 1  # random content: exactly one offset explains the crop
        found.append(matches[0])
    assert len({(dy, dx) for dy, dx, _ in found}) > 1
    assert {flip for _, _, flip in found} == {False, True}


def test_no_flip_when_hflip_is_false():
    x = torch.arange(32, dtype=torch.uint8).expand(6, 3, 32, 32).contiguous()  # left-right asymmetric
    for hflip in (False, True):
        loader = _loader(x, batch_size=6, crop_padding=0, hflip=hflip)
        flipped = [
            not torch.equal(img, x[lab])
            for _ in range(4)
            for batch, labels in loader
            for img, lab in zip(_pixels(batch), labels)
        ]
        assert any(flipped) == hflip


def test_len_and_drop_last():
    x = _images(10)
    assert len(_loader(x)) == 2 and [len(lab) for _, lab in _loader(x)] == [4, 4]
    assert len(_loader(x, drop_last=False)) == 3 and [len(lab) for _, lab in _loader(x, drop_last=False)] == [4, 4, 2]
    assert len(_loader(x, train=False)) == 3
    assert len(_loader(x[:3])) == 1 and [len(lab) for _, lab in _loader(x[:3])] == [3]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"resolution": 4}, "resolution=4"),
        ({"y": torch.arange(9)}, "one label per image"),
        ({"x": _images(10).float()}, "uint8"),
        ({"x": _images(10)[0]}, "uint8"),
        ({"mean": (0, 0)}, "one value per channel"),
        ({"std": (1, 0, 1)}, "std"),
    ],
)
def test_loader_validation(change, message):
    kw = {"batch_size": 4, "resolution": 32, "mean": (0, 0, 0), "std": (1, 1, 1), "train": True, **change}
    with pytest.raises(ValueError, match=message):
        BatchLoader(kw.pop("x", _images(10)), kw.pop("y", torch.arange(10)), **kw)


def test_for_split_uses_dataset_statistics(subset):
    loader = BatchLoader.for_split(subset, "val", batch_size=128, resolution=32, train=False)
    assert len(loader) == 4 and loader.hflip is True
    images, labels = next(iter(loader))
    mean, std = torch.tensor(subset.mean).view(1, 3, 1, 1), torch.tensor(subset.std).view(1, 3, 1, 1)
    expected = (torch.from_numpy(subset.x_val[:128]).double() / 255 - mean) / std
    assert torch.allclose(images, expected.float(), atol=1e-5) and labels.tolist() == subset.y_val[:128].tolist()
    with pytest.raises(ValueError, match="split='valid'"):
        BatchLoader.for_split(subset, "valid", batch_size=8, resolution=32, train=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_cpu():
    x = _images(64)
    cpu = [(img, lab) for img, lab in _loader(x, batch_size=16, resolution=40)]
    gpu = [(img, lab) for img, lab in _loader(x, batch_size=16, resolution=40, device="cuda")]
    assert all(i.device.type == "cuda" for i, _ in gpu)
    for (a, la), (b, lb) in zip(cpu, gpu):
        assert torch.equal(la, lb.cpu()) and torch.allclose(a, b.cpu(), atol=1e-5)


# --------------------------------------------------------------------------- numpy splits and Ray


def _assert_numpy_splits(data: Dataset):
    for split in ("train", "val", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        assert isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 4 and x.flags.c_contiguous
        assert isinstance(y, np.ndarray) and y.dtype == np.int64 and y.shape == (len(x),)


def test_splits_are_numpy_arrays(subset, small_npz):
    _assert_numpy_splits(subset)
    _assert_numpy_splits(load_dataset(str(small_npz), val_size=100))


def test_object_store_shares_the_arrays(ray_local, subset):
    """ray.get maps the arrays from the object store (read-only, not copied); loaders still work."""
    got = ray_local.get(ray_local.put(subset))
    for split in ("train", "val", "test"):
        x, y = getattr(got, f"x_{split}"), getattr(got, f"y_{split}")
        assert not x.flags.writeable and x.flags.owndata is False and not y.flags.writeable
        assert np.array_equal(x, getattr(subset, f"x_{split}"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "non-writable array" warning must not reach the user
        loader = BatchLoader(got.x_val, got.y_val, batch_size=100, resolution=32, mean=got.mean, std=got.std,
                             train=True, seed=1)
        batches = list(loader)
    assert loader.x.data_ptr() == got.x_val.ctypes.data  # a view of the shared array, no copy on CPU
    assert len(batches) == 5 and batches[0][0].shape == (100, 3, 32, 32)
    assert sorted(torch.cat([lab for _, lab in batches]).tolist()) == sorted(got.y_val.tolist())


def test_loader_takes_numpy_and_tensors_alike():
    x = _images(10)
    from_numpy = list(BatchLoader(x.numpy(), np.arange(10), batch_size=4, resolution=32, mean=(0, 0, 0),
                                  std=(1, 1, 1), train=True, seed=2))
    from_tensor = list(_loader(x, seed=2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(from_numpy, from_tensor))
    with pytest.raises(ValueError, match="uint8"):
        BatchLoader(x.numpy().astype(np.float32), np.arange(10), batch_size=4, resolution=32,
                    mean=(0, 0, 0), std=(1, 1, 1), train=True)
    with pytest.raises(ValueError, match="one label per image"):
        BatchLoader(x.numpy(), np.arange(9), batch_size=4, resolution=32, mean=(0, 0, 0), std=(1, 1, 1),
                    train=True)


# --------------------------------------------------------------------------- device tensors, once


def test_split_tensors_are_made_once_and_not_pickled():
    data = load_dataset("cifar10-subset")  # its own instance: the cache belongs to the instance
    pickled_size = len(pickle.dumps(data))
    x, y = data.split("train", "cpu")
    assert x.dtype == torch.uint8 and tuple(x.shape) == data.x_train.shape and y.dtype == torch.int64
    assert x.data_ptr() == data.x_train.ctypes.data and y.tolist() == data.y_train.tolist()  # CPU: no copy
    again = data.split("train", torch.device("cpu"))
    assert again[0] is x and again[1] is y
    assert tuple(data.split("test", "cpu")[0].shape) == data.x_test.shape
    train = BatchLoader.for_split(data, "train", batch_size=64, resolution=32, train=True)
    calib = BatchLoader.for_split(data, "train", batch_size=64, resolution=32, train=False)
    assert train.x is x and calib.x is x and train.y is y
    assert repr(data) == f"Dataset({data.summary()})"
    # The cached tensors are not pickled (they would double what Ray ships): same size as before.
    assert len(pickle.dumps(data)) == pickled_size
    clone = pickle.loads(pickle.dumps(data))
    assert clone.split("train", "cpu")[0] is not x and np.array_equal(clone.x_train, data.x_train)
    with pytest.raises(ValueError, match="split='valid'"):
        data.split("valid", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_split_on_cuda_is_one_copy():
    data = load_dataset("cifar10-subset")
    x, y = data.split("train", "cuda")
    assert x.device.type == "cuda" and data.split("train", torch.device("cuda", torch.cuda.current_device()))[0] is x
    train = BatchLoader.for_split(data, "train", batch_size=64, resolution=32, train=True, device="cuda")
    calib = BatchLoader.for_split(data, "train", batch_size=64, resolution=32, train=False, device="cuda")
    assert train.x.data_ptr() == calib.x.data_ptr() == x.data_ptr()
    assert torch.equal(x.cpu(), torch.from_numpy(data.x_train)) and torch.equal(y.cpu(), torch.from_numpy(data.y_train))


# --------------------------------------------------------------------------- BatchNorm calibration sample


@pytest.fixture(scope="module")
def class_sorted(tmp_path_factory):
    """The embedded subset with its training images sorted by label (as some files come)."""
    with np.load(embedded_dataset_path()) as z:
        arrays = {k: z[k] for k in z.files}
    order = np.argsort(arrays["y_train"], kind="stable")
    arrays["x_train"], arrays["y_train"] = arrays["x_train"][order], arrays["y_train"][order]
    path = tmp_path_factory.mktemp("sorted") / "cifar_sorted.npz"
    np.savez(path, **arrays)
    return load_dataset(str(path), val_size=500)


def _calibration(data, **kw):
    kw = {"resolution": 32, "batch_size": 128, "num_batches": 10, "seed": 0, "device": "cpu", **kw}
    return calibration_loader(data, **kw)


def test_calibration_sample_does_not_follow_file_order(class_sorted):
    in_file_order = next(iter(BatchLoader.for_split(class_sorted, "train", batch_size=128, resolution=32,
                                                    train=False)))[1]
    assert len(set(in_file_order.tolist())) == 1  # what calibrating on the first batches used to see
    loader = _calibration(class_sorted)
    first = next(iter(loader))[1]
    assert len(set(first.tolist())) >= 5
    # nothing else in data.py keeps the file's class order: validation and training batches mix classes
    assert len(set(class_sorted.y_val.tolist())) == 10
    train_batch = next(iter(BatchLoader.for_split(class_sorted, "train", batch_size=128, resolution=32, train=True)))
    assert len(set(train_batch[1].tolist())) >= 5


def test_calibration_sample_is_fixed_by_the_seed(class_sorted):
    loader = _calibration(class_sorted)
    batches = list(loader)
    assert len(loader) == 10 and [len(lab) for _, lab in batches] == [128] * 10 and loader.train is False
    again = list(_calibration(class_sorted))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    other = next(iter(_calibration(class_sorted, seed=1)))
    assert not torch.equal(other[1], batches[0][1])
    # distinct training images, each with its own label, normalised without augmentation
    train = {(img.tobytes(), int(lab)) for img, lab in zip(class_sorted.x_train, class_sorted.y_train)}
    sample = [(img.numpy().tobytes(), int(lab)) for img, lab in zip(loader.x, loader.y)]
    assert len(set(sample)) == 1280 and set(sample) <= train
    mean = torch.tensor(class_sorted.mean).view(1, 3, 1, 1)
    std = torch.tensor(class_sorted.std).view(1, 3, 1, 1)
    expected = (loader.x[:128].double() / 255 - mean) / std
    assert torch.allclose(batches[0][0], expected.float(), atol=1e-5)


def test_calibration_sample_size(class_sorted):
    n_train = len(class_sorted.y_train)
    everything = _calibration(class_sorted, batch_size=1000, num_batches=5)
    assert len(everything.y) == n_train and sorted(everything.y.tolist()) == sorted(class_sorted.y_train.tolist())
    assert [len(lab) for _, lab in everything] == [1000, 1000, 1000, n_train - 3000]
    assert len(_calibration(class_sorted, num_batches=0)) == 1  # recalibrate_bn(..., 0) uses none of it
    for bad, message in (({"num_batches": -1}, "num_batches=-1"), ({"seed": -2}, "seed=-2"),
                         ({"batch_size": 0}, "batch_size=0")):
        with pytest.raises(ValueError, match=message):
            _calibration(class_sorted, **bad)


# ------------------------------------------------------------------ Fashion-MNIST (real files)
needs_fashion_mnist = pytest.mark.skipif(
    not all((data_module.FASHION_MNIST_SYSTEM_DIR / f"{n}.gz").is_file()
            for n in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                      "t10k-labels-idx1-ubyte")),
    reason=f"Fashion-MNIST's idx files are not in {data_module.FASHION_MNIST_SYSTEM_DIR}: "
           "apt-get install dataset-fashion-mnist (.ci/run does)")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


@needs_fashion_mnist
def test_fashion_mnist_from_the_files_as_distributed(tmp_path, monkeypatch, capsys):
    """A directory holding the four idx .gz files (Debian's layout) is read with torchvision's
    FashionMNIST: extracted once into the default data directory, never into the source."""
    source = tmp_path / "debian"
    source.mkdir()
    for gz in data_module.FASHION_MNIST_SYSTEM_DIR.glob("*.gz"):
        (source / gz.name).symlink_to(gz)
    monkeypatch.setattr(data_module, "DEFAULT_DATA_DIR", tmp_path / "cache")
    data = load_dataset("fashion-mnist", data_dir=source, seed=3)
    assert "extracting Fashion-MNIST" in capsys.readouterr().out
    assert data.summary() == "fashion-mnist: 54000 train / 6000 val / 10000 test, 10 classes, images 1x28x28"
    assert data.classes == FASHION_CLASSES and data.in_channels == 1 and data.x_train.dtype == np.uint8
    # The real dataset: 6,000 training and 1,000 test images of every class.
    assert np.bincount(np.concatenate([data.y_train, data.y_val])).tolist() == [6000] * 10
    assert np.bincount(data.y_test).tolist() == [1000] * 10
    assert sorted(p.name for p in source.iterdir()) == sorted(p.name for p in source.glob("*.gz"))
    again = load_dataset("fashion-mnist", data_dir=source, seed=3)
    assert "extracting" not in capsys.readouterr().out  # extracted once
    assert np.array_equal(again.x_val, data.x_val) and np.array_equal(again.y_train, data.y_train)
    # The extracted copy is torchvision's layout: it can be the data directory itself.
    direct = load_dataset("fashion-mnist", data_dir=tmp_path / "cache", seed=3)
    assert np.array_equal(direct.x_test, data.x_test)


@needs_fashion_mnist
def test_fashion_mnist_is_found_where_debian_installs_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "DEFAULT_DATA_DIR", tmp_path / "cache")
    data = load_dataset("fashion-mnist", val_size=100)
    assert len(data.y_val) == 100 and len(data.y_train) == 59900 and data.classes == FASHION_CLASSES


def test_fashion_mnist_missing_names_both_ways_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "DEFAULT_DATA_DIR", tmp_path / "cache")
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion-mnist", data_dir=tmp_path / "empty")
    message = str(err.value)
    assert "--download" in message and "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path / "empty" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte") + " (missing)" in message
