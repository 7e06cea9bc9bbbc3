"""Splits for sources without one: deterministic, stable when images are added, never leaking."""
import json

import numpy as np
import pytest
from PIL import Image

from tokenizer.images import ImageSourceError, load_images, open_images
from tokenizer.splits import find_overlap, on_test_side, write_split_record


def _folder(root, counts, rng, size=8, start=0):
    """PNGs of random pixels, ``counts[c]`` in sub-folder ``c``; returns the relative paths."""
    paths = []
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + n):
            path = root / cls / f"{i:04d}.png"
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)
            paths.append(f"{cls}/{i:04d}.png")
    return paths


def test_split_is_deterministic_disjoint_and_stable_when_files_are_added(tmp_path):
    rng = np.random.default_rng(0)
    _folder(tmp_path, {"a": 100, "b": 60}, rng)
    train, test = open_images(tmp_path, "train"), open_images(tmp_path, "test")
    train_keys, test_keys = set(train.keys), set(test.keys)
    assert not train_keys & test_keys and len(train_keys | test_keys) == 160
    assert 0.1 < len(test_keys) / 160 < 0.3  # about the default 20 %
    for c in (0, 1):  # stratified in expectation: each class loses about its share
        assert 0.05 < np.mean(test.labels == c) * len(test) / np.sum(np.concatenate([train.labels, test.labels]) == c) < 0.35
    assert set(open_images(tmp_path, "test").keys) == test_keys  # the same on every call
    _folder(tmp_path, {"a": 50, "c": 40}, rng, start=100)  # more images, and a new class
    train2, test2 = set(open_images(tmp_path, "train").keys), set(open_images(tmp_path, "test").keys)
    assert train_keys <= train2 and test_keys <= test2  # nothing that was there moved side
    assert on_test_side(["a/0000.png"], 0.2).tolist() == on_test_side(["a/0000.png"], 0.2).tolist()


def test_arrays_split_by_pixels_so_duplicates_stay_together(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (200, 6, 6), dtype=np.uint8)
    images[150:] = images[:50]  # 50 exact duplicates
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(200) % 2)
    train, test = load_images(tmp_path / "d.npz", "train"), load_images(tmp_path / "d.npz", "test")
    assert len(train) + len(test) == 200
    seen = {im.tobytes() for im in train.images}
    assert not any(im.tobytes() in seen for im in test.images)


def test_test_source_and_overlap_is_refused(tmp_path):
    rng = np.random.default_rng(2)
    _folder(tmp_path / "train", {"a": 10, "b": 10}, rng)
    _folder(tmp_path / "test", {"a": 4, "b": 4}, rng, start=50)
    train = open_images(tmp_path / "train", "train", test_source=str(tmp_path / "test"))
    test = open_images(tmp_path / "train", "test", test_source=str(tmp_path / "test"))
    assert (len(train), len(test)) == (20, 8)  # an explicit test set: the source is all training
    find_overlap(test, [train], progress=False)  # disjoint: no error
    # the same pixels under another name on the training side are refused, naming both files
    Image.open(tmp_path / "test" / "a" / "0050.png").save(tmp_path / "train" / "a" / "copy.png")
    train = open_images(tmp_path / "train", "train", test_source=str(tmp_path / "test"))
    with pytest.raises(ImageSourceError, match=r"a/0050\.png == a/copy\.png"):
        find_overlap(test, [train], progress=False)
    with pytest.raises(ImageSourceError, match="also appear"):  # the leak the issue found: test = train
        write_split_record(tmp_path / "split.json", str(tmp_path / "train"), str(tmp_path / "train"), [], 0.2,
                           progress=False)


def test_labels_csv_and_its_errors(tmp_path):
    rng = np.random.default_rng(3)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "labels.csv").write_text("path,label\n" + "".join(f"{i}.png,{'ok' if i % 2 else 'bad'}\n"
                                                                  for i in range(6)))
    s = load_images(tmp_path, "all")  # a folder with labels.csv: labelled by it
    assert s.class_names == ["bad", "ok"] and s.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert s.images.shape == (6, 8, 8, 3)
    assert load_images(tmp_path / "labels.csv", "all").labels.tolist() == s.labels.tolist()
    (tmp_path / "labels.csv").write_text("0.png,ok\nmissing.png,bad\n")
    with pytest.raises(ImageSourceError, match=r"row 2 names .*missing\.png"):
        load_images(tmp_path, "all")


def test_limit_is_spread_over_a_class_sorted_folder(tmp_path):
    _folder(tmp_path, {"a": 20, "b": 20}, np.random.default_rng(4))
    s = load_images(tmp_path, "all", limit=10)
    assert len(s) == 10 and set(s.labels.tolist()) == {0, 1}


def test_split_record_counts_warns_and_is_reused(tmp_path):
    rng = np.random.default_rng(5)
    _folder(tmp_path / "imgs", {"big": 60, "tiny": 6}, rng)
    _folder(tmp_path / "more", {"x": 5}, rng)
    record = write_split_record(tmp_path / "split.json", str(tmp_path / "imgs"), None, [str(tmp_path / "more")],
                                0.2, progress=False)
    assert sum(record["train"].values()) + sum(record["test"].values()) == 66
    assert list(record["unlabeled"].values()) == [5] and record["image_shape"] == [8, 8, 1]
    assert any("'tiny'" in w for w in record["warnings"])  # < 5 test images in a class
    assert set(record["test_keys"]).isdisjoint(record["train_keys"])
    again = write_split_record(tmp_path / "split.json", str(tmp_path / "imgs"), None, [str(tmp_path / "more")],
                               0.2, progress=False)
    assert again == json.loads((tmp_path / "split.json").read_text())
    with pytest.raises(ImageSourceError, match="another split"):
        write_split_record(tmp_path / "split.json", str(tmp_path / "imgs"), None, [], 0.3, progress=False)


def test_unlabeled_or_single_class_sources_are_refused_for_a_labelled_run(tmp_path):
    rng = np.random.default_rng(6)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    with pytest.raises(ImageSourceError, match="no labels"):
        write_split_record(tmp_path / "s.json", str(tmp_path), None, [], 0.2, progress=False)
    _folder(tmp_path / "one", {"only": 30}, rng)
    with pytest.raises(ImageSourceError, match="fewer than 2 classes"):
        write_split_record(tmp_path / "s2.json", str(tmp_path / "one"), None, [], 0.2, progress=False)


def test_streamed_shards_of_a_folder_with_unlabeled_images_and_a_corrupt_file(tmp_path):
    from conftest import PixelTokenizer
    from tokenizer.shards import open_source, read_token_shards, write_token_shards

    rng = np.random.default_rng(7)
    _folder(tmp_path / "imgs", {"a": 30, "b": 30}, rng, size=4)
    _folder(tmp_path / "more", {"u": 7}, rng, size=4)
    (tmp_path / "more" / "u" / "broken.png").write_bytes(b"not a png")
    src = open_source(str(tmp_path / "imgs"), "train", None, None, on_error="skip",
                      unlabeled=[str(tmp_path / "more")])
    n_train = len(open_images(tmp_path / "imgs", "train"))
    with pytest.warns(UserWarning, match="broken.png"):
        meta = write_token_shards(PixelTokenizer(256, (4, 4)), src, tmp_path / "shards", batch_size=5, progress=False)
    shards = read_token_shards(tmp_path / "shards")
    assert len(shards) == n_train + 7  # every readable image, the broken one left out
    assert len(meta["skipped"]) == 1 and meta["skipped"][0].endswith("u/broken.png")
    assert shards.labels is None  # pretraining shards: the labelled images' labels are dropped
    first = np.asarray(Image.open(tmp_path / "imgs" / open_images(tmp_path / "imgs", "train").keys[0]))
    np.testing.assert_array_equal(shards.tokens[0], first)  # ids are the pixels, in source order
