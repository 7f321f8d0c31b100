"""Layouts, the split, and datasets that survive bad files."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import colour_image, make_class_folders, make_kaggle_folder

from catdog.runtime.data import DataError, discover, discover_sources, stratified_split

from catdog.training.datasets import ImageFileDataset, collate_skipping_bad_images
from catdog.runtime.transforms import Preprocess, eval_transform


def test_kaggle_flat_layout(tmp_path):
    root = make_kaggle_folder(tmp_path / "train", per_class=3)
    (root / ".DS_Store").write_bytes(b"junk")
    images = discover(root)
    assert images.layout == "kaggle"
    assert images.class_names == ["cat", "dog"]
    assert images.class_counts() == {"cat": 3, "dog": 3}
    assert all(path.name.startswith(images.class_names[label]) for path, label in zip(images.paths, images.labels))
    assert any(why == "hidden file" for _, why in images.ignored)


def test_kaggle_parent_folder_with_train_and_test1(tmp_path):
    make_kaggle_folder(tmp_path / "train", per_class=2)
    (tmp_path / "test1").mkdir()
    colour_image(0, 1).save(tmp_path / "test1" / "1.jpg")
    images = discover(tmp_path)
    assert images.layout == "kaggle" and len(images) == 4 and images.root == tmp_path / "train"


def test_class_folders_and_petimages(tmp_path):
    make_class_folders(tmp_path / "PetImages", per_class=3)
    (tmp_path / "PetImages" / "Cat" / "nested").mkdir()
    colour_image(0, 99).save(tmp_path / "PetImages" / "Cat" / "nested" / "deep.png")
    (tmp_path / "PetImages" / "Dog" / "Thumbs.db").write_bytes(b"windows junk")
    images = discover(tmp_path)  # the download folder holding PetImages/
    assert images.layout == "folders"
    assert images.class_counts() == {"Cat": 4, "Dog": 3}
    assert any("Thumbs.db" in path for path, _ in images.ignored)


def test_csv_manifest(tmp_path):
    make_class_folders(tmp_path / "pics", per_class=2, classes=("a", "b"))
    rows = ["path,label"] + [f"pics/a/{i}.jpg,apple" for i in range(2)] + [f"pics/b/{i}.jpg,banana" for i in range(2)]
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    images = discover(tmp_path / "manifest.csv")
    assert images.layout == "csv" and images.class_names == ["apple", "banana"] and len(images) == 4
    assert all(path.exists() for path in images.paths)


def test_manifest_without_columns_is_a_clear_error(tmp_path):
    (tmp_path / "bad.csv").write_text("file,class\nx.jpg,cat\n")
    with pytest.raises(DataError, match="path,label"):
        discover(tmp_path / "bad.csv")


def test_single_class_and_empty_class_are_errors(tmp_path):
    make_kaggle_folder(tmp_path / "one", per_class=2, classes=("cat",))
    with pytest.raises(DataError, match="need at least two"):
        discover(tmp_path / "one")
    make_class_folders(tmp_path / "two", per_class=2, classes=("cat", "dog"))
    (tmp_path / "two" / "bird").mkdir()
    with pytest.raises(DataError, match="bird"):
        discover(tmp_path / "two")


def test_symlink_outside_the_folder_is_followed(tmp_path):
    outside = tmp_path / "elsewhere.jpg"
    colour_image(0, 5).save(outside)
    root = make_class_folders(tmp_path / "data", per_class=2)
    os.symlink(outside, root / "Cat" / "link.jpg")
    images = discover(root)
    assert root / "Cat" / "link.jpg" in images.paths and images.class_counts() == {"Cat": 3, "Dog": 2}


def test_split_is_stratified_disjoint_and_reproducible():
    labels = [0] * 70 + [1] * 30
    train_a, val_a = stratified_split(labels, 0.2, seed=1)
    train_b, val_b = stratified_split(labels, 0.2, seed=1)
    _, val_c = stratified_split(labels, 0.2, seed=2)
    assert (train_a, val_a) == (train_b, val_b)
    assert val_a != val_c
    assert not set(train_a) & set(val_a) and len(train_a) + len(val_a) == 100
    assert sum(labels[i] == 0 for i in val_a) == 14 and sum(labels[i] == 1 for i in val_a) == 6


def test_split_keeps_every_class_in_both_parts():
    labels = [0] * 50 + [1] * 2 + [2] * 3
    train, val = stratified_split(labels, 0.1, seed=0)
    assert {labels[i] for i in val} == {0, 1, 2} and {labels[i] for i in train} == {0, 1, 2}


def test_dataset_skips_bad_files_without_crashing(tmp_path):
    good = tmp_path / "good.jpg"
    colour_image(1, 1).save(good)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    html = tmp_path / "page.jpg"
    html.write_text("<html></html>")
    dataset = ImageFileDataset([good, empty, html], [1, 0, 0], eval_transform(Preprocess(32)))
    batch = collate_skipping_bad_images([dataset[i] for i in range(3)])
    assert batch.images.shape == (1, 3, 32, 32)
    assert batch.labels.tolist() == [1] and batch.indices.tolist() == [0]
    assert {e.path for e in batch.errors} == {str(empty), str(html)}
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1, collate_fn=collate_skipping_bad_images)
    assert sum(len(b.labels) for b in loader) == 1


def test_augmentation_seed_makes_each_images_augmentation_independent_of_who_draws_it(tmp_path):
    """Training sets `augmentation_seed` per epoch, so under torchrun every process augments image i exactly as one
    process would, whatever its generator's state; the caller's generator is left alone."""
    from catdog.training.augmentation import Augmentation, train_transform

    folder = make_kaggle_folder(tmp_path / "train", per_class=2)
    paths = sorted(folder.glob("*.jpg"))
    dataset = ImageFileDataset(paths, [0] * len(paths), train_transform(Preprocess(32, 0.875), Augmentation()))
    dataset.augmentation_seed = 4200003
    torch.manual_seed(1)
    first = dataset[1]["image"]
    state = torch.get_rng_state()
    torch.manual_seed(2)
    torch.rand(17)  # another process, in another state
    assert torch.equal(dataset[1]["image"], first)
    torch.set_rng_state(state)
    dataset[1]
    assert torch.equal(torch.get_rng_state(), state)
    dataset.augmentation_seed = 4200004  # the next epoch draws anew
    assert not torch.equal(dataset[1]["image"], first)
    dataset.augmentation_seed = None  # unseeded: the usual draws from the generator
    torch.manual_seed(3)
    unseeded = dataset[1]["image"]
    assert not torch.equal(dataset[1]["image"], unseeded)


# ---------------------------------------------------------------- several sources (`catdog train --data A --data B`)


def later_photos(root, names_and_labels, seed=5000):
    """New photos for a second source: (relative path, label) each, a colour per label."""
    for index, (relative, label) in enumerate(names_and_labels):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        colour_image(label, seed + index).save(root / relative)
    return root


def test_kaggle_and_class_folders_merge_with_a_duplicate_across_them_left_out_and_reported(tmp_path):
    kaggle = make_kaggle_folder(tmp_path / "train", per_class=4)
    later = later_photos(tmp_path / "later", [("Cat/new0.jpg", 0), ("Dog/new1.jpg", 1), ("Dog/new2.jpg", 1)])
    (later / "Cat" / "copy-of-cat1.jpg").write_bytes((kaggle / "cat.1.jpg").read_bytes())
    images, report = discover_sources([kaggle, later])
    assert images.class_names == ["cat", "dog"]  # PetImages-style "Cat" joins Kaggle's "cat"
    assert report.renamed_classes == {"Cat": "cat", "Dog": "dog"}
    assert images.class_counts() == {"cat": 5, "dog": 6} and len(images) == 11
    assert report.duplicates == [(str((later / "Cat" / "copy-of-cat1.jpg").absolute()), str((kaggle / "cat.1.jpg").absolute()), False)]
    assert [s.duplicates for s in report.sources] == [0, 1] and [s.layout for s in report.sources] == ["kaggle", "folders"]
    assert images.layout == "kaggle+folders" and images.root == tmp_path
    assert sorted(images.relative_paths())[:2] == ["later/Cat/new0.jpg", "later/Dog/new1.jpg"]
    text = report.describe()
    assert "1 byte-identical files left out" in text and "copy-of-cat1.jpg" in text and "'Cat' taken as 'cat'" in text
    train_part, val_part = stratified_split(images.labels, 0.25, 0)  # one split over the merged set
    assert len(train_part) + len(val_part) == 11 and not set(train_part) & set(val_part)


def test_class_folders_and_a_manifest_merge_and_a_copy_labelled_differently_is_a_conflict(tmp_path):
    folders = make_class_folders(tmp_path / "pets", per_class=3, classes=("cat", "dog"))
    later_photos(tmp_path / "inbox", [("a.jpg", 0), ("b.jpg", 1)])
    (tmp_path / "inbox" / "c.jpg").write_bytes((folders / "dog" / "0.jpg").read_bytes())
    (tmp_path / "inbox" / "d.jpg").write_bytes((tmp_path / "inbox" / "a.jpg").read_bytes())  # a copy within a source
    (tmp_path / "inbox" / "labels.csv").write_text("path,label\na.jpg,cat\nb.jpg,dog\nc.jpg,cat\nd.jpg,cat\n")
    images, report = discover_sources([folders, tmp_path / "inbox" / "labels.csv"])
    assert [s.layout for s in report.sources] == ["folders", "csv"] and images.layout == "folders+csv"
    assert len(images) == 8 and images.class_counts() == {"cat": 4, "dog": 4}
    assert len(report.duplicates) == 2 and report.label_conflicts == 1  # c.jpg: a dog photo labelled cat
    conflict = next(entry for entry in report.duplicates if entry[2])
    assert conflict[0].endswith("inbox/c.jpg") and conflict[1].endswith("pets/dog/0.jpg")
    assert "labelled differently" in report.describe()


def test_a_source_without_a_class_gives_the_union_said_plainly(tmp_path):
    kaggle = make_kaggle_folder(tmp_path / "train", per_class=3)
    later = later_photos(tmp_path / "more", [("cat.100.jpg", 0), ("bird.1.jpg", 2), ("bird.2.jpg", 2)])
    images, report = discover_sources([kaggle, later])
    assert images.class_names == ["bird", "cat", "dog"] and images.class_counts() == {"bird": 2, "cat": 4, "dog": 3}
    assert "has no photos of dog" in report.describe() and "has no photos of bird" in report.describe()


def test_one_source_is_read_exactly_as_before(tmp_path):
    kaggle = make_kaggle_folder(tmp_path / "train", per_class=3)
    (kaggle / "cat.9.jpg").write_bytes((kaggle / "cat.0.jpg").read_bytes())  # a duplicate: `data audit` reports it
    images, report = discover_sources([kaggle])
    plain = discover(kaggle)
    assert images.paths == plain.paths and images.root == plain.root and len(images) == 7 and not report.duplicates


def test_kaggle_names_and_a_manifest_merge(tmp_path):
    kaggle = make_kaggle_folder(tmp_path / "train", per_class=3)
    later_photos(tmp_path / "new", [("x.jpg", 0), ("y.jpg", 1)])
    (tmp_path / "new" / "z.jpg").write_bytes((kaggle / "dog.2.jpg").read_bytes())
    (tmp_path / "new" / "m.csv").write_text("path,label\nx.jpg,cat\ny.jpg,dog\nz.jpg,dog\n")
    images, report = discover_sources([kaggle, tmp_path / "new" / "m.csv"])
    assert images.layout == "kaggle+csv" and images.class_counts() == {"cat": 4, "dog": 4}
    assert len(report.duplicates) == 1 and report.label_conflicts == 0 and report.duplicates[0][0].endswith("new/z.jpg")
