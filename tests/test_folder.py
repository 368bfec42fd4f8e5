"""A folder of images in class subfolders as a dataset (aebnas/data/folder.py, images.py, cache.py, fit.py).

Every test writes real image files with Pillow (PNG, JPEG, BMP, WebP; RGB, RGBA, L, P, 16-bit,
an EXIF-rotated JPEG) and reads them through ``load_dataset`` as a search does.
"""

import dataclasses
import json
import os
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from aebnas.cli import main
from aebnas.data.datasets import dataset_label, load_dataset
from aebnas.data.fit import fitted_batch_size, fitted_resolutions
from aebnas.data.folder import FolderError, read_folder, stratified_test_mask
from aebnas.data.images import decode_images, read_image
from aebnas.search.experiment import Experiment, fitted_to_data, with_saved_fits


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test keeps decoded folders in its own cache directory."""
    monkeypatch.setenv("AEBNAS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def gray(value: int, size=(20, 20)) -> Image.Image:
    return Image.new("L", size, value)


def save(image: Image.Image, path, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)


def folder_of_gray(root, classes=("a", "b"), per_class=10, size=(20, 20)):
    """``root/<class>/<i>.png``: class k's images have the gray level 40 + 100·k + i."""
    for k, name in enumerate(classes):
        for i in range(per_class):
            save(gray(40 + 100 * k + i, size), root / name / f"{i:03d}.png")
    return root


def lines(capsys) -> str:
    return capsys.readouterr().out


# ---------------------------------------------------------------- images of any size and mode
def test_each_mode_and_format_decodes_to_the_stored_size(tmp_path):
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[..., 0] = 200
    cases = {
        "rgb.png": (Image.fromarray(rgb), {}, (200, 0, 0)),
        "rgba.webp": (Image.fromarray(np.dstack([rgb, np.full((30, 40), 10, np.uint8)]), "RGBA"),
                      {"lossless": True}, (200, 0, 0)),
        "gray.jpg": (gray(90, (24, 32)), {"quality": 100}, 90),
        "pal.bmp": (Image.fromarray(rgb).convert("P"), {}, (204, 0, 0)),  # the web palette's nearest red
        "gray16.png": (Image.fromarray(np.full((28, 28), 65535 // 2, np.uint16)), {}, 128),
        "one_bit.png": (Image.new("1", (16, 16), 1), {}, 255),
    }
    for name, (image, kw, expected) in cases.items():
        save(image, tmp_path / name, **kw)
        pixels = read_image(tmp_path / name, 24)
        assert pixels.dtype == np.uint8 and pixels.shape[:2] == (24, 24), name
        centre = pixels[12, 12]
        if isinstance(expected, tuple):
            assert pixels.ndim == 3 and np.abs(centre.astype(int) - expected).max() <= 2, (name, centre)
        else:
            assert pixels.ndim == 2 and abs(int(centre) - expected) <= 1, (name, centre)


def test_exif_orientation_is_applied(tmp_path):
    # 40 wide, 20 high: left half white. EXIF orientation 6 says "rotate 90° clockwise to view":
    # upright, the image is 20 wide and 40 high with its white half on top.
    pixels = np.zeros((20, 40), np.uint8)
    pixels[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    save(Image.fromarray(pixels), tmp_path / "rotated.jpg", exif=exif, quality=100)
    upright = read_image(tmp_path / "rotated.jpg", 20)  # the middle 20x20 square of the 20x40 upright image
    assert upright[:5].mean() > 200 and upright[-5:].mean() < 50


def test_mixed_sizes_and_modes_make_one_rgb_array(tmp_path, capsys):
    root = tmp_path / "pets"
    save(Image.new("RGB", (50, 30), (250, 10, 10)), root / "cat" / "c1.png")
    save(Image.new("RGBA", (33, 33), (10, 250, 10, 128)), root / "cat" / "c2.webp", lossless=True)
    save(gray(77, (64, 64)), root / "cat" / "c3.jpg", quality=100)
    save(Image.fromarray(np.full((30, 30), 20000, np.uint16)), root / "dog" / "d1.png")
    save(Image.new("RGB", (30, 30), (0, 0, 255)).convert("P"), root / "dog" / "d2.bmp")
    save(gray(5, (31, 29)), root / "dog" / "d3.png")
    data = load_dataset(str(root), val_size=1, test_size=0.3)
    out = lines(capsys)
    assert data.classes == ["cat", "dog"] and data.in_channels == 3
    assert data.x_train.shape[1:] == (3, 30, 30)  # the median of the shorter sides 29, 30, 30, 30, 33, 64
    assert "images stored at 30x30 px, 3 channels (RGB): the median shorter side of 6 images" in out
    x = np.concatenate([data.x_train, data.x_val, data.x_test])
    y = np.concatenate([data.y_train, data.y_val, data.y_test])
    assert len(x) == 6 and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    levels = sorted(int(v) for v in x[:, :, 15, 15].max(axis=1))  # the brightest channel of each image
    assert levels == sorted([250, 250, 77, round(20000 / 257), 255, 5])  # 16-bit scaled, not clipped


def test_grayscale_folder_is_one_channel_and_a_colour_image_makes_three(tmp_path, capsys):
    root = folder_of_gray(tmp_path / "g")
    data = load_dataset(str(root))
    assert data.in_channels == 1 and "1 channel (every image is grayscale)" in lines(capsys)
    save(Image.new("RGB", (20, 20), (255, 0, 0)), root / "b" / "zz.png")
    data = load_dataset(str(root))
    assert data.in_channels == 3
    x = np.concatenate([data.x_train, data.x_val, data.x_test])
    grays = x[(x[:, 0] == x[:, 1]).all(axis=(1, 2)) & (x[:, 1] == x[:, 2]).all(axis=(1, 2))]
    assert len(grays) == 20  # the gray images repeated into R, G and B


def test_default_size_is_the_median_shorter_side_at_most_72(tmp_path, capsys):
    root = folder_of_gray(tmp_path / "big", size=(300, 200))
    data = load_dataset(str(root))
    assert data.x_train.shape[-2:] == (72, 72)
    assert "images stored at 72x72 px" in lines(capsys)
    data = load_dataset(str(root), image_size=40)
    assert data.x_train.shape[-2:] == (40, 40)


# ---------------------------------------------------------------- layouts and splits
def test_train_and_test_folders_are_the_splits(tmp_path):
    root = tmp_path / "split"
    folder_of_gray(root / "train", per_class=8)
    folder_of_gray(root / "test", per_class=3)
    data = load_dataset(str(root), val_size=4)
    assert data.classes == ["a", "b"]
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (12, 4, 6)
    assert sorted(data.x_test[:, 0, 0, 0].tolist()) == [40, 41, 42, 140, 141, 142]


def test_a_class_named_train_is_a_class(tmp_path):
    root = folder_of_gray(tmp_path / "vehicles", classes=("bus", "train"))
    data = load_dataset(str(root))
    assert data.classes == ["bus", "train"] and len(data.y_test) == 4  # 20% of each class drawn as test


def test_test_split_is_stratified_and_seeded(tmp_path):
    y = np.repeat(np.arange(3), [10, 20, 5])
    mask = stratified_test_mask(y, 0.2)
    assert np.bincount(y[mask]).tolist() == [2, 4, 1]
    assert (mask == stratified_test_mask(y, 0.2)).all() and not (mask == stratified_test_mask(y, 0.2, seed=1)).all()


def test_nothing_depends_on_the_order_files_were_written(tmp_path):
    def write(root, order):
        for i in order:
            save(gray(i, (12, 12)), root / ("a" if i % 2 else "b") / f"{i:03d}.png")
        return load_dataset(str(root), val_size=5)

    one, two = write(tmp_path / "one", range(40)), write(tmp_path / "two", reversed(range(40)))
    for split in ("train", "val", "test"):
        assert (getattr(one, f"x_{split}") == getattr(two, f"x_{split}")).all()
        assert (getattr(one, f"y_{split}") == getattr(two, f"y_{split}")).all()


def test_splits_are_views_of_one_array(tmp_path):
    data = load_dataset(str(folder_of_gray(tmp_path / "v", per_class=30)))
    assert data.x_train.base is not None and data.x_train.base is data.x_test.base is data.x_val.base
    assert all(getattr(data, f"x_{s}").flags.c_contiguous for s in ("train", "val", "test"))


def test_dataset_label_names_a_folder_by_its_last_part():
    assert dataset_label("/data/my pets/") == "my pets" and dataset_label("x/y.npz") == "y"
    assert dataset_label("cifar10") == "cifar10"


# ---------------------------------------------------------------- the cache
def test_second_load_reads_the_cache_and_a_changed_folder_is_decoded_again(tmp_path, capsys, cache):
    root = folder_of_gray(tmp_path / "c")
    first = load_dataset(str(root))
    assert "decoded 20 images" in lines(capsys) and len(list(cache.iterdir())) == 1
    again = load_dataset(str(root))
    assert "read from" in lines(capsys)
    assert (first.x_train == again.x_train).all() and first.classes == again.classes
    save(gray(1), root / "a" / "new.png")
    load_dataset(str(root))
    assert "decoded 21 images" in lines(capsys)
    os.utime(root / "a" / "000.png", ns=(1, 1))  # touched: its modification time is part of the key
    load_dataset(str(root))
    assert "decoded 21 images" in lines(capsys)
    assert len(list(cache.iterdir())) == 1  # the old entry was replaced


def test_a_damaged_cache_entry_is_decoded_again(tmp_path, capsys, cache):
    root = folder_of_gray(tmp_path / "d")
    load_dataset(str(root))
    (next(cache.iterdir()) / "x.npy").write_bytes(b"not an array")
    load_dataset(str(root))
    assert "decoded 20 images" in lines(capsys).split("aebnas: warning")[0]


def test_decoding_prints_progress_lines(tmp_path):
    root = folder_of_gray(tmp_path / "p", per_class=3)
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    said: list[str] = []
    decode_images(root, paths, 20, log=said.append, every_s=0)  # a line after every image
    assert said[0].startswith(f"aebnas: decoding {root}: 1/6 images (17%), ") and "left" in said[0]
    assert said[-1].startswith(f"aebnas: decoding {root}: 6/6 images (100%)")


def test_decoding_keeps_one_copy_of_the_images(tmp_path):
    root = tmp_path / "m"
    for i in range(300):
        save(Image.new("RGB", (64, 64), (i % 256, 0, 0)), root / f"{i:03d}.png")
    paths = sorted(p.name for p in root.iterdir())
    tracemalloc.start()
    decoded = decode_images(root, paths, 64, log=print)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert decoded.x.shape == (300, 3, 64, 64)
    assert peak < 1.4 * decoded.x.nbytes + 200_000, (peak, decoded.x.nbytes)


# ---------------------------------------------------------------- bad input: named, never a traceback
@pytest.mark.parametrize("make, message", [
    (lambda r: (folder_of_gray(r), (r / "c").mkdir()), "class folder(s) with no image: "),
    (lambda r: folder_of_gray(r, classes=("only",)), "has one class only (only)"),
    (lambda r: [save(gray(i), r / f"{i}.png") for i in range(3)], "holds 3 image(s) but no class folders"),
    (lambda r: (folder_of_gray(r / "train"), folder_of_gray(r / "test", classes=("a", "b", "z"))),
     "has class folder(s) that"),
])
def test_bad_folders_are_refused_naming_the_problem(tmp_path, make, message):
    root = tmp_path / "bad"
    root.mkdir()
    make(root)
    with pytest.raises(FolderError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_dataset(str(root))


def test_unreadable_files_are_skipped_and_named(tmp_path, capsys):
    root = folder_of_gray(tmp_path / "s")
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "a" / "fake.png").write_text("not an image either")
    good = (root / "b" / "000.png").read_bytes()
    (root / "b" / "cut.png").write_bytes(good[: len(good) // 2])
    save(gray(1), root / "loose.png")
    data = load_dataset(str(root))
    out = lines(capsys)
    assert len(data.y_train) + len(data.y_val) + len(data.y_test) == 20
    assert "skipped 2 file(s)" in out and "a/fake.png" in out and "b/cut.png" in out
    assert "not read, not image files by their extension" in out and "a/notes.txt" in out
    assert "loose.png" in out and "beside the class folders" in out
    load_dataset(str(root))  # from the cache: the same warnings again
    assert "skipped 2 file(s)" in lines(capsys)


def test_a_class_whose_every_file_fails_stops(tmp_path):
    root = folder_of_gray(tmp_path / "f")
    (root / "c").mkdir()
    (root / "c" / "x.jpg").write_text("no")
    with pytest.raises(FolderError, match=r"stopping: no image of class\(es\) c"):
        load_dataset(str(root))


def test_a_test_class_train_lacks_and_a_train_class_test_lacks(tmp_path, capsys):
    root = tmp_path / "t"
    folder_of_gray(root / "train", classes=("a", "b", "c"))
    folder_of_gray(root / "test", classes=("a", "b"))
    load_dataset(str(root))
    assert "has no images of class(es) c" in lines(capsys)


@pytest.mark.parametrize("kw, message", [
    ({"image_size": 4}, "image_size=4 must be an integer from 8 to 1024"),
    ({"test_size": 1.5}, "test_size=1.5 must be a fraction"),
])
def test_bad_sizes_are_named(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        load_dataset(str(folder_of_gray(tmp_path / "z")), **kw)


def test_test_size_with_a_test_folder_is_refused(tmp_path):
    root = tmp_path / "tt"
    folder_of_gray(root / "train")
    folder_of_gray(root / "test")
    with pytest.raises(FolderError, match="has a test folder"):
        load_dataset(str(root), test_size=0.1)


def test_search_on_a_bad_folder_exits_with_one_message(tmp_path, capsys):
    root = tmp_path / "one"
    folder_of_gray(root, classes=("solo",))
    code = main(["search", "--dataset", str(root), "--num-samples", "1", "--epochs", "1",
                 "--storage-path", str(tmp_path / "results"), "--name", "x"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("aebnas: error: ") and "one class only (solo)" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- defaults that fit the data
def test_resolutions_follow_the_stored_size():
    assert fitted_resolutions(28)[0] == (32, 36, 40, 44, 48, 52, 56)
    assert fitted_resolutions(32)[0] == tuple(range(32, 65, 4))
    assert fitted_resolutions(64)[0] == (64, 68, 72)
    assert fitted_resolutions(200)[0] == (72,)


def test_batch_size_leaves_steps_to_learn():
    assert fitted_batch_size(1200)[0] == 16   # 75 steps; not smaller than 16
    assert fitted_batch_size(7200)[0] == 64   # 113 steps (128: 57)
    assert fitted_batch_size(45000)[0] == 128  # the paper's datasets keep 128
    assert "1200 training images would make 10 steps an epoch at 128; 16 makes 75" in fitted_batch_size(1200)[1]


def test_own_dataset_gets_fitted_settings_and_given_ones_are_kept(tmp_path, capsys):
    data = load_dataset(str(folder_of_gray(tmp_path / "own", per_class=50)))
    lines(capsys)
    fitted = fitted_to_data(Experiment(dataset=str(tmp_path / "own")), data)
    out = lines(capsys)
    assert fitted.space_kwargs["resolutions"] == (32, 36, 40) and fitted.batch_size == 16
    assert fitted.classes == ("a", "b")
    assert "batch size 16" in out and "resolutions 32,36,40" in out
    given = fitted_to_data(Experiment(dataset=str(tmp_path / "own"), batch_size=8,
                                      space_kwargs={"resolutions": (48,)}), data)
    assert given.batch_size == 8 and given.space_kwargs["resolutions"] == (48,)
    named = fitted_to_data(Experiment(dataset="cifar10"), data)
    assert named.batch_size == 128 and "resolutions" not in named.space_kwargs


def test_a_resumed_search_keeps_what_was_fitted_when_it_started():
    from aebnas.search.tuner import resume_conflicts

    started = Experiment(dataset="/data/own", name="n", batch_size=16, space_kwargs={"resolutions": (32, 36)},
                         classes=("a", "b"))
    again = Experiment(dataset="/data/own", name="n", resume=True)  # the flags left open, as when it started
    resumed = with_saved_fits(again, started.to_json())
    assert (resumed.batch_size, resumed.space_kwargs, resumed.classes) == (16, {"resolutions": (32, 36)}, ("a", "b"))
    assert resume_conflicts(started.to_json(), again) == ([], [])
    other = dataclasses.replace(again, batch_size=32)  # given on --resume: a change, refused as any other
    assert resume_conflicts(started.to_json(), other)[0] == ["batch_size=32 (saved 16)"]

# ---------------------------------------------------------------- class names travel, end to end
@pytest.mark.slow
def test_folder_search_retrain_export_and_predict_carry_the_class_names(ray_local, tmp_path, capsys):
    """A real search on a folder (Ray Tune), retrain, TorchScript and ONNX exports, predict and the analysis:
    every one names the classes as the folder does."""
    from analysis.__main__ import run_analysis
    from aebnas.deploy.onnx_export import export_onnx
    from aebnas.deploy.retrain import RetrainRequest, retrain
    from aebnas.deploy.torchscript import export, predict
    from aebnas.search.experiment import experiment_path
    from aebnas.search.tuner import run

    root = tmp_path / "shapes"
    rng = np.random.default_rng(0)
    for name, level in (("dark", 30), ("light", 220)):
        for i in range(40):
            noisy = np.clip(level + rng.normal(0, 20, (24, 24)), 0, 255).astype(np.uint8)
            save(Image.fromarray(noisy), root / name / f"{i:02d}.png")
    exp = Experiment(dataset=str(root), supernet=None, epochs=1, num_samples=1, width_mult=0.25, target_macs=1.0,
                     scheduler="fifo", storage_path=str(tmp_path / "results"), name="shapes", verbose=0)
    assert len(run(exp)) == 1
    out = capsys.readouterr().out
    assert "batch size 16" in out and "resolutions 32,36,40,44,48" in out
    assert len(run(dataclasses.replace(exp, resume=True))) == 1  # resumed with what was fitted: nothing refused
    path = experiment_path(exp)
    arch = json.loads(next((tmp_path / "results" / "shapes").glob("trial_*/arch.json")).read_text())
    assert arch["classes"] == ["dark", "light"] and arch["batch_size"] == 16
    retrain(RetrainRequest(path, best=True, epochs=1, out=str(tmp_path / "run")), log=lambda _: None)
    assert json.loads((tmp_path / "run" / "arch.json").read_text())["classes"] == ["dark", "light"]
    meta = export(tmp_path / "run", tmp_path / "model.pt", log=lambda _: None)
    onnx_meta = export_onnx(tmp_path / "run", tmp_path / "onnx", log=lambda _: None)
    assert meta["classes"] == onnx_meta["classes"] == ["dark", "light"]
    save(Image.new("RGBA", (50, 40), (250, 250, 250, 255)), tmp_path / "new.png")  # another size and mode
    for model in (tmp_path / "model.pt", tmp_path / "onnx"):
        (p,) = predict(model, [tmp_path / "new.png"])
        assert p.class_name in ("dark", "light") and 0 <= p.probability <= 1 and 0 <= p.exit <= p.num_exits
    run_analysis([path], tmp_path / "analysis")
    summary = (tmp_path / "analysis" / "summary.md").read_text()
    assert "| dark | 8 |" in summary and "| light | 8 |" in summary  # 20% of each class
    assert list((tmp_path / "analysis").glob("classes_*.png"))
