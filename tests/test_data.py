"""Label noise, meta splits and datasets: noise rates and targets, disjoint splits, formats kept after splitting."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from transformers import default_data_collator

from metatrain.data import (
    NOISE_TYPES,
    class_balanced_meta_split,
    corrupt_labels,
    load_digits_dataset,
    load_image_classification_dataset,
    make_noisy_label_splits,
    noise_transition_matrix,
)

K = 10


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset(test_size=0.3, seed=0)


def clean_labels(n: int = 10_000, seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, K, n)


def raw(split: datasets.Dataset, column: str) -> np.ndarray:
    return np.asarray(split.with_format("numpy")[column])


# ----------------------------------------------------------------------------------------------------- label noise
@pytest.mark.parametrize("noise_type", NOISE_TYPES)
@pytest.mark.parametrize("noise_rate", [0.2, 0.4, 0.6])
def test_noise_fraction_matches_expected(noise_type, noise_rate):
    labels = clean_labels()
    noisy, is_noisy = corrupt_labels(labels, K, noise_type, noise_rate, seed=0)
    expected = noise_rate * (K - 1) / K if noise_type == "uniform" else noise_rate
    assert noisy.dtype == np.int64 and is_noisy.dtype == bool and noisy.shape == labels.shape
    np.testing.assert_array_equal(is_noisy, noisy != labels)
    assert abs(is_noisy.mean() - expected) < 0.02, (is_noisy.mean(), expected)


@pytest.mark.parametrize("noise_type", NOISE_TYPES)
def test_noise_follows_transition_matrix(noise_type):
    labels = clean_labels(20_000)
    noisy, _ = corrupt_labels(labels, K, noise_type, 0.4, seed=1)
    matrix = noise_transition_matrix(K, noise_type, 0.4)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
    empirical = np.zeros((K, K))
    np.add.at(empirical, (labels, noisy), 1)
    empirical /= empirical.sum(axis=1, keepdims=True)
    assert np.abs(empirical - matrix).max() < 0.03
    # classes with zero probability are never drawn
    assert not empirical[matrix == 0].any()


def test_flip_noise_goes_only_to_fixed_targets():
    labels = clean_labels()
    noisy, is_noisy = corrupt_labels(labels, K, "flip", 0.4, seed=0)
    np.testing.assert_array_equal(noisy[is_noisy], (labels[is_noisy] + 1) % K)
    noisy, is_noisy = corrupt_labels(labels, K, "flip2", 0.4, seed=0)
    offset = (noisy[is_noisy] - labels[is_noisy]) % K
    assert set(np.unique(offset)) == {1, 2}
    assert abs((offset == 1).mean() - 0.5) < 0.03


def test_noise_rate_bounds():
    labels = clean_labels(1000)
    for noise_type in NOISE_TYPES:
        noisy, is_noisy = corrupt_labels(labels, K, noise_type, 0.0, seed=0)
        np.testing.assert_array_equal(noisy, labels)
        assert not is_noisy.any()
    assert corrupt_labels(labels, K, "flip", 1.0, seed=0)[1].all()
    assert corrupt_labels(labels, K, "flip2", 1.0, seed=0)[1].all()


def test_noise_seeds_and_global_rng():
    labels = clean_labels()
    np.random.seed(7)
    state = np.random.get_state()[1].copy()
    first, _ = corrupt_labels(labels, K, "uniform", 0.5, seed=3)
    again, _ = corrupt_labels(labels, K, "uniform", 0.5, seed=3)
    other, _ = corrupt_labels(labels, K, "uniform", 0.5, seed=4)
    np.testing.assert_array_equal(first, again)
    assert (first != other).mean() > 0.1
    np.testing.assert_array_equal(np.random.get_state()[1], state)


def test_noise_rejects_bad_arguments():
    labels = clean_labels(100)
    with pytest.raises(ValueError, match=r"'gaussian'.*uniform.*flip.*flip2"):
        corrupt_labels(labels, K, "gaussian", 0.4, seed=0)
    for rate in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=rf"noise_rate.*{rate}"):
            corrupt_labels(labels, K, "uniform", rate, seed=0)
    with pytest.raises(ValueError, match=r"'flip2'.*num_classes >= 3.*2"):
        corrupt_labels(np.array([0, 1]), 2, "flip2", 0.4, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        corrupt_labels(np.array([0, 10]), K, "uniform", 0.4, seed=0)


# ------------------------------------------------------------------------------------------------------ meta split
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_meta_split_is_balanced_disjoint_and_complete(seed):
    labels = clean_labels(2000)
    train, meta = class_balanced_meta_split(labels, 7, seed=seed)
    np.testing.assert_array_equal(np.bincount(labels[meta], minlength=K), np.full(K, 7))
    assert np.intersect1d(train, meta).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, meta])), np.arange(labels.size))
    assert (np.diff(train) > 0).all() and (np.diff(meta) > 0).all()
    assert train.dtype == meta.dtype == np.int64


def test_meta_split_seeds():
    labels = clean_labels(2000)
    train0, meta0 = class_balanced_meta_split(labels, 5, seed=0)
    train0b, meta0b = class_balanced_meta_split(labels, 5, seed=0)
    train1, meta1 = class_balanced_meta_split(labels, 5, seed=1)
    np.testing.assert_array_equal(meta0, meta0b)
    np.testing.assert_array_equal(train0, train0b)
    assert not np.array_equal(meta0, meta1)
    # Meta-Weight-Net's failure mode: a meta set drawn with another seed than the training split overlaps it
    assert np.intersect1d(train0, meta1).size > 0


def test_meta_split_needs_a_training_example_per_class():
    labels = np.array([0] * 5 + [1] * 5 + [2] * 3)
    train, meta = class_balanced_meta_split(labels, 2, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[train]), [3, 3, 1])
    with pytest.raises(ValueError, match=r"class 2 has 3"):
        class_balanced_meta_split(labels, 3, seed=0)
    with pytest.raises(ValueError, match=r"num_meta_per_class.*0"):
        class_balanced_meta_split(labels, 0, seed=0)


# ---------------------------------------------------------------------------------------------------------- digits
def test_digits_dataset(no_network):
    ds = load_digits_dataset(test_size=0.3, seed=0)
    assert set(ds) == {"train", "test"}
    assert (len(ds["train"]), len(ds["test"])) == (1257, 540)
    assert ds["train"].features["labels"].num_classes == 10
    for split in ds.values():
        example = split[0]
        assert example["pixel_values"].shape == (1, 8, 8) and example["pixel_values"].dtype == torch.float32
        assert example["labels"].dtype == torch.int64
        labels = raw(split, "labels")
        assert labels.min() == 0 and labels.max() == 9 and len(np.unique(labels)) == 10
    pixels = raw(ds["train"], "pixel_values")
    assert abs(pixels.mean()) < 1e-4 and abs(pixels.std() - 1) < 1e-3
    batch = default_data_collator([ds["train"][i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 1, 8, 8) and batch["labels"].dtype == torch.int64
    other = load_digits_dataset(test_size=0.3, seed=1)
    assert not torch.equal(ds["test"][:5]["pixel_values"], other["test"][:5]["pixel_values"])


# ---------------------------------------------------------------------------------------------- noisy-label splits
def check_noisy_splits(splits, source, num_meta_per_class, num_classes):
    train, meta = splits["train"], splits["meta"]
    train_index, meta_index = raw(train, "index"), raw(meta, "index")
    assert np.intersect1d(train_index, meta_index).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train_index, meta_index])), np.arange(len(source)))
    source_labels = raw(source, "labels")
    for split, index in ((train, train_index), (meta, meta_index)):
        np.testing.assert_array_equal(raw(split, "clean_labels"), source_labels[index])
        np.testing.assert_array_equal(raw(split, "is_noisy"), raw(split, "labels") != raw(split, "clean_labels"))
    np.testing.assert_array_equal(raw(meta, "labels"), source_labels[meta_index])
    assert not raw(meta, "is_noisy").any()
    counts = np.bincount(raw(meta, "labels"), minlength=num_classes)
    np.testing.assert_array_equal(counts, np.full(num_classes, num_meta_per_class))


def test_noisy_splits_on_digits(digits):
    splits = make_noisy_label_splits(digits, 10, "uniform", 0.4, num_meta_per_class=10, seed=0)
    assert set(splits) == {"train", "meta", "test"} and splits["test"] is digits["test"]
    check_noisy_splits(splits, digits["train"], 10, 10)
    assert (len(splits["train"]), len(splits["meta"])) == (1157, 100)
    assert abs(raw(splits["train"], "is_noisy").mean() - 0.4 * 9 / 10) < 0.05
    # the torch format survives and rows keep their pixels
    for name in ("train", "meta"):
        split = splits[name]
        assert split.format["type"] == "torch"
        example = split[3]
        assert example["pixel_values"].shape == (1, 8, 8) and example["labels"].dtype == torch.int64
        assert torch.equal(example["pixel_values"], digits["train"][int(example["index"])]["pixel_values"])
        batch = default_data_collator([split[i] for i in range(4)])
        assert batch["pixel_values"].shape == (4, 1, 8, 8)
    again = make_noisy_label_splits(digits, 10, "uniform", 0.4, num_meta_per_class=10, seed=0)
    other = make_noisy_label_splits(digits, 10, "uniform", 0.4, num_meta_per_class=10, seed=1)
    np.testing.assert_array_equal(raw(again["train"], "labels"), raw(splits["train"], "labels"))
    assert not np.array_equal(raw(other["meta"], "index"), raw(splits["meta"], "index"))


def test_noisy_splits_flip_and_selected_source(digits):
    source = datasets.DatasetDict({"train": digits["train"].select(range(600)), "test": digits["test"]})
    splits = make_noisy_label_splits(source, 10, "flip", 0.3, num_meta_per_class=5, seed=2)
    check_noisy_splits(splits, source["train"], 5, 10)
    train = splits["train"]
    is_noisy = raw(train, "is_noisy")
    np.testing.assert_array_equal(raw(train, "labels")[is_noisy], (raw(train, "clean_labels")[is_noisy] + 1) % 10)
    assert abs(is_noisy.mean() - 0.3) < 0.07


def test_noisy_splits_keep_a_partial_format(digits):
    source = datasets.DatasetDict({"train": digits["train"].with_format("numpy", columns=["labels"])})
    splits = make_noisy_label_splits(source, 10, "uniform", 0.2, num_meta_per_class=3, seed=0)
    assert splits["train"].format["type"] == "numpy" and splits["train"].format["columns"] == ["labels"]
    assert set(splits["meta"][0]) == {"labels"}


def test_noisy_splits_reject_bad_input(digits):
    with pytest.raises(ValueError, match=r"'train'"):
        make_noisy_label_splits(datasets.DatasetDict({"test": digits["test"]}), 10, "uniform", 0.2, 3, seed=0)
    with pytest.raises(ValueError, match=r"'bad'"):
        make_noisy_label_splits(digits, 10, "bad", 0.2, 3, seed=0)
    with pytest.raises(ValueError, match=r"class \d has \d+"):
        make_noisy_label_splits(digits, 10, "uniform", 0.2, 1000, seed=0)


# ---------------------------------------------------------------------------------------------------- image folder
def test_image_folder_dataset_and_noisy_splits(image_folder, tmp_path, no_network):
    ds = load_image_classification_dataset(str(image_folder), cache_dir=str(tmp_path / "cache"))
    assert set(ds) == {"train", "test"} and (len(ds["train"]), len(ds["test"])) == (12, 6)
    assert ds["train"].features["labels"].num_classes == 3
    assert ds["train"].column_names == ["image", "labels"]
    for split in ds.values():
        example = split[0]
        assert example["pixel_values"].shape == (3, 32, 32) and example["pixel_values"].dtype == torch.float32
        assert example["labels"] in (0, 1, 2)
    assert sorted(raw(ds["test"], "labels").tolist()) == [0, 0, 1, 1, 2, 2]
    # test images are not augmented: the same tensor every time
    assert torch.equal(ds["test"][1]["pixel_values"], ds["test"][1]["pixel_values"])

    splits = make_noisy_label_splits(ds, 3, "flip", 0.5, num_meta_per_class=1, seed=0)
    check_noisy_splits(splits, ds["train"], 1, 3)
    assert (len(splits["train"]), len(splits["meta"])) == (9, 3) and splits["test"] is ds["test"]
    for name in ("train", "meta"):
        split = splits[name]
        # the transform is still attached and was never run into stored columns
        assert "pixel_values" not in split.column_names
        example = split[0]
        assert example["pixel_values"].shape == (3, 32, 32)
        assert {"labels", "clean_labels", "is_noisy", "index"} <= set(example)
        batch = default_data_collator([split[i] for i in range(3)])
        assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["labels"].dtype == torch.int64
    test_image = splits["test"][0]["pixel_values"]
    assert torch.equal(test_image, ds["test"][0]["pixel_values"])

    # a source with an indices mapping: `add_column` flattens it with `map`, which must not run the transform
    shuffled = datasets.DatasetDict({"train": ds["train"].shuffle(seed=0), "test": ds["test"]})
    splits = make_noisy_label_splits(shuffled, 3, "uniform", 0.5, num_meta_per_class=2, seed=1)
    check_noisy_splits(splits, shuffled["train"], 2, 3)
    assert "pixel_values" not in splits["train"].column_names
    assert splits["train"][0]["pixel_values"].shape == (3, 32, 32)


def test_image_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match=r"'imagenet'.*cifar10"):
        load_image_classification_dataset("imagenet")
    from PIL import Image

    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "train" / "a" / "0.png")
    with pytest.raises(ValueError, match=r"\['test'\]"):
        load_image_classification_dataset(str(tmp_path), cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("name, repo, label_column", [("cifar10", "uoft-cs/cifar10", "label"),
                                                      ("CIFAR100", "uoft-cs/cifar100", "fine_label")])  # fmt: skip
def test_cifar_from_the_hub_maps_columns(monkeypatch, name, repo, label_column):
    """The Hub path: `datasets.load_dataset(repo)` is stood in for by local data with CIFAR's own column names."""
    from PIL import Image

    rng = np.random.default_rng(0)
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        features = datasets.Features({"img": datasets.Image(), label_column: datasets.ClassLabel(num_classes=3),
                                      "coarse_label": datasets.Value("int64")})  # fmt: skip
        images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
        split = {"img": images, label_column: [0, 1, 2, 0], "coarse_label": [0] * 4}
        return datasets.DatasetDict(
            {s: datasets.Dataset.from_dict(split, features=features) for s in ("train", "test")}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_image_classification_dataset(name, cache_dir="/tmp/cache")
    assert calls == [(repo, {"cache_dir": "/tmp/cache"})]
    assert ds["train"].column_names == ["image", "labels"] and ds["train"].features["labels"].num_classes == 3
    example = ds["test"][1]
    assert example["pixel_values"].shape == (3, 32, 32) and example["labels"] == 1
    assert load_image_classification_dataset(name, image_size=16)["train"][0]["pixel_values"].shape == (3, 16, 16)


def test_graded_sources_give_each_source_its_share_of_corrupted_examples():
    from metatrain.data import graded_sources

    corrupted = np.zeros(4000, dtype=bool)
    corrupted[np.random.default_rng(0).permutation(4000)[:2000]] = True
    sources = graded_sources(corrupted, 4, seed=1)
    shares = [corrupted[sources == k].mean() for k in range(4)]
    np.testing.assert_allclose(shares, [0, 1 / 3, 2 / 3, 1], atol=0.04)
    assert shares[0] == 0 and shares[3] == 1  # the first source is clean, the last all corrupted
    np.testing.assert_allclose(np.bincount(sources) / 4000, 0.25, atol=0.03)
    assert np.array_equal(graded_sources(corrupted, 4, seed=1), sources)
    assert not graded_sources(corrupted, 1).any()
    with pytest.raises(ValueError, match="num_sources must be an integer >= 1"):
        graded_sources(corrupted, 0)
