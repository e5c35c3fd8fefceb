"""Image folders, list files, preprocessing, bad and hostile images."""

import numpy as np
import pytest
from PIL import Image

from qatool.errors import DataError, UsageError
from qatool.data.images import ImageDataset, augment, batch_indices
from qatool.data.preprocess import Preprocess

GRAY28 = Preprocess(size=(28, 28), color="gray", mean=(0.5,), std=(0.25,))


def _png(path, value=128, size=(28, 28), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_folder_classes_sorted_and_labels_file(tmp_path):
    for cls in ("b", "a", "c"):
        _png(tmp_path / cls / "1.png")
    ds = ImageDataset.open(tmp_path)
    assert ds.classes == ["a", "b", "c"]
    assert sorted(label for _, label in ds.samples) == [0, 1, 2]
    ds2 = ImageDataset.open(tmp_path, ["c", "b", "a"])
    assert dict((p.parent.name, label) for p, label in ds2.samples) == {"c": 0, "b": 1, "a": 2}
    with pytest.raises(DataError, match="not in the labels file"):
        ImageDataset.open(tmp_path, ["a", "b"])


def test_list_file_and_bad_line_number(tmp_path):
    _png(tmp_path / "img" / "x.png", 10)
    _png(tmp_path / "img" / "y.png", 20)
    lst = tmp_path / "train.txt"
    lst.write_text("# comment\nimg/x.png 0\n\nimg/y.png 3\n")
    ds = ImageDataset.open(lst)
    assert [label for _, label in ds.samples] == [0, 3] and ds.num_classes == 4
    loaded = ds.load(GRAY28)
    assert loaded.images[0, 0, 0, 0] == 10 and loaded.images[1, 0, 0, 0] == 20
    lst.write_text("img/x.png 0\nimg/y.png\n")
    with pytest.raises(DataError, match=r"train.txt:2:"):
        ImageDataset.open(lst)


def test_corrupt_truncated_and_non_image_files_are_skipped_and_counted(tmp_path):
    _png(tmp_path / "a" / "good.png")
    (tmp_path / "a" / "corrupt.png").write_bytes(b"not an image at all")
    good = (tmp_path / "a" / "good.png").read_bytes()
    (tmp_path / "a" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "a" / "notes.txt").write_text("ignored: not an image suffix")
    loaded = ImageDataset.open(tmp_path).load(GRAY28)
    assert len(loaded) == 1
    assert sorted(p.name for p in loaded.skipped) == ["corrupt.png", "truncated.png"]


def test_nothing_usable_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bad.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="could be read"):
        ImageDataset.open(tmp_path).load(GRAY28)
    flat = ImageDataset.open(tmp_path / "a")  # a folder of images with no class sub-folders: data without labels
    assert not flat.labelled and flat.classes == [] and len(flat) == 1
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        ImageDataset.open(tmp_path / "empty")
    with pytest.raises(DataError, match="not found"):
        ImageDataset.open(tmp_path / "missing")


def test_decompression_bomb_is_refused(tmp_path):
    big = tmp_path / "a" / "bomb.png"
    big.parent.mkdir(parents=True)
    Image.new("1", (10000, 10000)).save(big)  # 100 Mpixels, a small file
    _png(tmp_path / "a" / "ok.png")
    loaded = ImageDataset.open(tmp_path).load(GRAY28)
    assert [p.name for p in loaded.skipped] == ["bomb.png"]


def test_preprocessing_resize_color_and_normalisation(tmp_path):
    _png(tmp_path / "a" / "rgb.png", (255, 0, 0), size=(40, 30), mode="RGB")
    rgb = Preprocess(size=(20, 10), color="rgb", mean=(0.0, 0.5, 0.5), std=(1.0, 0.5, 0.5))
    x, y = ImageDataset.open(tmp_path).load(rgb).batch(np.array([0]))
    assert x.shape == (1, 3, 20, 10) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 0, 0], [1.0, -1.0, -1.0], atol=1e-6)
    bgr = Preprocess(size=(20, 10), color="bgr")
    x, _ = ImageDataset.open(tmp_path).load(bgr).batch(np.array([0]))
    np.testing.assert_allclose(x[0, :, 0, 0], [0.0, 0.0, 1.0], atol=1e-6)
    with pytest.raises(UsageError, match="mean needs 1 or 3"):
        Preprocess(size=(2, 2), color="rgb", mean=(0.1, 0.2))


def test_batches_are_a_pure_function_of_seed_and_step():
    a = [batch_indices(100, 32, s, seed=1) for s in range(6)]
    b = [batch_indices(100, 32, s, seed=1) for s in range(6)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    epoch0 = np.concatenate(a[:3])
    assert len(set(epoch0.tolist())) == 96  # no repeats within an epoch
    assert not np.array_equal(a[0], batch_indices(100, 32, 0, seed=2))


def test_augment_keeps_shape_and_moves_pixels():
    img = np.zeros((4, 16, 16, 1), np.uint8)
    img[:, 8, 8] = 255
    out = augment(img, np.random.default_rng(0))
    assert out.shape == img.shape and out.dtype == np.uint8
    assert (out.reshape(4, -1).max(1) <= 255).all()
    assert not np.array_equal(out, img)


def test_streamed_set_equals_in_memory_set(tmp_path):
    """A set larger than the memory budget is streamed (decoded per batch, prefetched): same batches."""
    for i in range(7):
        _png(tmp_path / str(i % 3) / f"{i}.png", value=i * 30)
    (tmp_path / "1" / "broken.png").write_bytes(b"junk")
    ds = ImageDataset.open(tmp_path)
    mem = ds.load(GRAY28)
    streamed = ds.load(GRAY28, max_bytes=100)
    assert type(streamed).__name__ == "StreamingImages" and len(streamed) == 8
    idx = np.array([6, 0, 3])
    fut = streamed.prefetch(idx)
    good = [i for i, (p, _) in enumerate(ds.samples) if p.name != "broken.png"]
    np.testing.assert_array_equal(fut.result(), mem.uint8_batch(np.array([good.index(i) if i in good else 0
                                                                          for i in idx])))
    batches = list(streamed.batches(3))
    assert [len(y) for _, y in batches] == [3, 3, 2]
    broken = [i for i, (p, _) in enumerate(ds.samples) if p.name == "broken.png"][0]
    x_all = np.concatenate([x for x, _ in batches])
    assert np.all(x_all[broken] == x_all[broken].flat[0])  # blank stand-in
    assert [p.name for p in streamed.skipped] == ["broken.png"]


def test_training_on_a_streamed_set(lenet, digits, tmp_path, monkeypatch):
    from qatool import api
    from qatool.data import images as data_module
    from qatool.train.config import TrainConfig

    monkeypatch.setattr(data_module, "IN_MEMORY_BYTES", 1000)
    train, val = digits
    made = []
    original = data_module.StreamingImages.__init__

    def spy(self, *args, **kwargs):
        made.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(data_module.StreamingImages, "__init__", spy)
    report = api.train_quant(lenet, train, tmp_path, val_data=val, train=TrainConfig(steps=4),
                             echo=lambda s: None, quiet=True)
    assert len(made) == 2  # the training and the validation sets were streamed
    assert report["steps"] == 4 and report["val"]["agreement_top1"] >= 0.99


# ---- data without labels, resize modes, tensor folders ------------------------------------------------------
def test_nested_folder_without_labels(tmp_path):
    """Any folder of images is data: flat or nested, read without labels when labels are not wanted."""
    _png(tmp_path / "x" / "deep" / "1.png", 10)
    _png(tmp_path / "y" / "2.png", 20)
    _png(tmp_path / ".hidden" / "3.png", 30)
    ds = ImageDataset.open(tmp_path, labelled=False)
    assert not ds.labelled and [p.name for p, _ in ds.samples] == ["1.png", "2.png"]
    loaded = ds.load(GRAY28)
    assert loaded.labels is None
    x, y = loaded.batch(np.arange(2))
    assert y is None and x.shape == (2, 1, 28, 28)
    assert ImageDataset.open(tmp_path).labelled  # the same folder read as class folders when labels are wanted


def _wide(path, size=(40, 10), value=200):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)


def test_resize_pad_keeps_the_ratio_and_pads_right_in_the_normalised_space(tmp_path):
    """PaddleOCR's recogniser: full height, width ceil(H * w / h), padded right with 0 after normalisation."""
    _wide(tmp_path / "a.png", (40, 10))  # ratio 4 -> 8 x 32 in an 8 x 64 input
    _wide(tmp_path / "b.png", (200, 10))  # ratio 20 -> squeezed to the full width
    pre = Preprocess(size=(8, 64), color="gray", mean=(0.5,), std=(0.5,), resize="pad", pad_value=-7.0)
    loaded = ImageDataset.open(tmp_path, labelled=False).load(pre)
    x, _ = loaded.batch(np.arange(2))
    expected = (200 / 255 - 0.5) / 0.5
    np.testing.assert_allclose(x[0, 0, :, :32], expected, rtol=1e-6)
    np.testing.assert_array_equal(x[0, 0, :, 32:], -7.0)
    np.testing.assert_allclose(x[1, 0], expected, rtol=1e-6)
    assert Preprocess.from_json(pre.to_json()) == pre


def test_resize_letterbox_centres(tmp_path):
    _wide(tmp_path / "a.png", (40, 10))  # into 20 x 20: scale 0.5 -> 5 x 20, rows 7..11
    pre = Preprocess(size=(20, 20), color="gray", resize="letterbox", pad_value=114 / 255)
    assert pre.placement(40, 10) == (7, 0, 5, 20)
    x, _ = ImageDataset.open(tmp_path, labelled=False).load(pre).batch(np.arange(1))
    np.testing.assert_allclose(x[0, 0, 7:12], 200 / 255, rtol=1e-6)
    np.testing.assert_allclose(x[0, 0, :7], 114 / 255, rtol=1e-6)
    np.testing.assert_allclose(x[0, 0, 12:], 114 / 255, rtol=1e-6)
    # streamed from disk, the same values
    streamed = ImageDataset.open(tmp_path, labelled=False).load(pre, max_bytes=1)
    np.testing.assert_array_equal(next(streamed.batches(4))[0], x)


def test_tensor_folder_is_batched_by_shape(tmp_path):
    from qatool.data import TensorSet, open_dataset

    rng = np.random.default_rng(0)
    arrays = {}
    for i, w in enumerate([32, 48, 32, 32, 48]):
        a = rng.standard_normal((3, 8, w)).astype(np.float32)
        arrays[i] = a
        np.save(tmp_path / f"{i:02d}.npy", a if i != 3 else a[None])  # [1, C, H, W] is taken too
    ts = open_dataset(tmp_path)
    assert isinstance(ts, TensorSet) and ts.load(None) is ts and ts.labels is None
    assert [list(g) for g in ts.groups] == [[0, 2, 3], [1, 4]]
    seen = []
    for x, y in ts.batches(2):
        assert y is None and len({x.shape}) == 1
        seen.append(x)
    assert [x.shape for x in seen] == [(2, 3, 8, 32), (1, 3, 8, 32), (2, 3, 8, 48)]
    np.testing.assert_array_equal(seen[0][1], arrays[2])
    for step in range(8):  # training batches never mix shapes, and are a pure function of (seed, step)
        idx = batch_indices(ts.groups, 2, step, seed=5)
        assert len({ts.shapes[i] for i in idx}) == 1
        np.testing.assert_array_equal(idx, batch_indices(ts.groups, 2, step, seed=5))
    epoch = np.concatenate([batch_indices(ts.groups, 2, s, 5) for s in range(3)])
    assert sorted(epoch) == [0, 1, 2, 3, 4]  # one epoch visits every file once
    ts.check_fits([1, 3, 8, "W"], "the model")
    with pytest.raises(DataError, match=r"00.npy holds a tensor of shape \[3, 8, 32\] but the model takes \[N, 1, 8, \?\]"):
        ts.check_fits(["N", 1, 8, "W"], "the model")


def test_tensor_folder_pads_free_sizes_up_to_a_multiple(tmp_path):
    from qatool.data import open_dataset

    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((3, 8, w)).astype(np.float32) for w in (30, 17, 33, 64, 5)]
    for i, a in enumerate(arrays):
        np.save(tmp_path / f"{i:02d}.npy", a)
    ts = open_dataset(tmp_path).pad_free_dims([1, 3, 8, "W"], 32, pad_value=-1.5)
    assert [list(g) for g in ts.groups] == [[0, 1, 4], [2, 3]]  # widths 32 and 64
    assert ts.item_shape(4) == (3, 8, 32) and ts.item_shape(2) == (3, 8, 64)
    x, _ = ts.batch(np.array([0, 1, 4]))
    assert x.shape == (3, 3, 8, 32)
    for row, i in zip(x, (0, 1, 4)):
        w = arrays[i].shape[2]
        np.testing.assert_array_equal(row[:, :, :w], arrays[i])  # the tensor itself, unchanged, at the left
        assert np.all(row[:, :, w:] == np.float32(-1.5))  # the pad value on the right
    for step in range(4):  # training batches never mix padded sizes
        assert len({ts.item_shape(int(i)) for i in batch_indices(ts.groups, 2, step, seed=3)}) == 1
    # a size the model fixes is never padded; 1 keeps every size apart
    fixed = open_dataset(tmp_path).pad_free_dims([1, 3, 8, 64], 32)
    assert [fixed.item_shape(i) for i in range(5)] == [a.shape for a in arrays]
    assert len(open_dataset(tmp_path).pad_free_dims([1, 3, "H", "W"], 1).groups) == 5
    with pytest.raises(DataError, match="the pad multiple must be at least 1"):
        ts.pad_free_dims([1, 3, 8, "W"], 0)


def test_tensor_folder_refuses_other_ranks(tmp_path):
    from qatool.data import open_dataset

    np.save(tmp_path / "a.npy", np.zeros((8, 8), np.float32))
    with pytest.raises(DataError, match=r"a.npy holds a tensor of shape \[8, 8\]"):
        open_dataset(tmp_path)
