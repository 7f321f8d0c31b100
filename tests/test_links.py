"""Data folders made of symbolic links: followed wherever they lead; broken links and loops reported and skipped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import make_class_folders, make_kaggle_folder

from catdog.cli import main
from catdog.runtime.data import DataError, discover, find_image_files
from catdog.runtime.predict import collect_inputs


def link_folder(sources: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for source in sources:
        os.symlink(source, folder / source.name)
    return folder


@pytest.mark.slow
def test_a_folder_of_links_elsewhere_trains(tmp_path):
    originals = make_kaggle_folder(tmp_path / "read-only-input", per_class=10)
    links = link_folder(sorted(originals.glob("*.jpg")), tmp_path / "work" / "train")
    os.symlink(tmp_path / "nowhere.jpg", links / "cat.999.jpg")
    os.symlink(links / "dog.loop.jpg", links / "dog.loop.jpg")
    images = discover(links)
    assert images.layout == "kaggle" and len(images) == 20 and images.class_counts() == {"cat": 10, "dog": 10}
    assert {(Path(path).name, why) for path, why in images.ignored} == {
        ("cat.999.jpg", "broken symbolic link"), ("dog.loop.jpg", "symbolic link loop")}
    code = main(["train", "--data", str(links), "--out", str(tmp_path / "run"), "--model", "simple_cnn", "--strategy",
                 "finetune", "--epochs", "1", "--batch-size", "8", "--image-size", "32", "--num-workers", "0",
                 "--no-progress"])
    assert code == 0 and (tmp_path / "run" / "model.safetensors").is_file()


def test_linked_class_folders_and_a_loop_back_to_the_top(tmp_path):
    originals = make_class_folders(tmp_path / "PetImages", per_class=3)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("Cat", "Dog"):
        os.symlink(originals / name, data / name)  # folder links
    os.symlink(data, originals / "Cat" / "back-to-the-top")  # data/Cat/back-to-the-top -> data: a loop
    images = discover(data)
    assert images.class_counts() == {"Cat": 3, "Dog": 3}
    assert (str(data / "Cat" / "back-to-the-top"), "symbolic link loop") in images.ignored


def test_a_folder_reached_twice_is_searched_once(tmp_path):
    folder = tmp_path / "photos"
    make_kaggle_folder(folder / "first", per_class=2)
    os.symlink(folder / "first", folder / "second")
    found, ignored = find_image_files(folder)
    assert sorted(path.name for path in found) == ["cat.0.jpg", "cat.1.jpg", "dog.0.jpg", "dog.1.jpg"]
    assert ignored == [(str(folder / "second"), "folder already searched through another link")]


def test_a_loop_inside_the_searched_folder_is_reported_once(tmp_path):
    folder = tmp_path / "photos"
    (folder / "inner").mkdir(parents=True)
    make_kaggle_folder(folder / "inner", per_class=1)
    os.symlink(folder, folder / "inner" / "up")
    os.symlink(folder / "inner", folder / "inner" / "self")
    found, ignored = find_image_files(folder)
    assert sorted(path.name for path in found) == ["cat.0.jpg", "dog.0.jpg"]
    assert sorted((Path(path).name, why) for path, why in ignored) == [
        ("self", "symbolic link loop"), ("up", "symbolic link loop")]


def test_nothing_left_says_how_many_were_left_out_and_why(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "train"
    folder.mkdir()
    for index in range(3):
        os.symlink(tmp_path / f"gone-{index}.jpg", folder / f"cat.{index}.jpg")
    os.symlink(folder / "dog.0.jpg", folder / "dog.0.jpg")
    with pytest.raises(DataError, match=r"no images found .*4 left out: 3 broken symbolic link, 1 symbolic link loop"):
        discover(folder)
    capsys.readouterr()

    def no_model_needed(*arguments, **options):
        raise AssertionError("a model was loaded although there is nothing to predict")

    import catdog.model_files

    monkeypatch.setattr(catdog.model_files, "open_model", no_model_needed)
    assert main(["predict", str(folder), "--no-progress"]) == 1  # the same message, before any model is loaded
    assert "4 left out: 3 broken symbolic link, 1 symbolic link loop" in capsys.readouterr().err
    paths, left_out = collect_inputs([str(folder), str(folder / "cat.0.jpg")])
    assert paths == [] and len(left_out) == 5


def test_predict_follows_links_and_lists_the_bad_ones(tmp_path):
    originals = make_kaggle_folder(tmp_path / "elsewhere", per_class=2)
    folder = link_folder(sorted(originals.glob("*.jpg")), tmp_path / "links")
    os.symlink(tmp_path / "gone.jpg", folder / "gone.jpg")
    paths, left_out = collect_inputs([str(folder)])
    assert len(paths) == 4 and all(path.is_symlink() for path in paths)
    assert left_out == [(str(folder / "gone.jpg"), "broken symbolic link")]


@pytest.mark.slow
def test_400_links_to_the_shared_photos_train(shared_data, tmp_path):
    sources = sorted((shared_data / "train").glob("cat.1*.jpg"))[:200] + sorted((shared_data / "train").glob("dog.1*.jpg"))[:200]
    links = link_folder(sources, tmp_path / "subset")
    code = main(["train", "--data", str(links), "--out", str(tmp_path / "run"), "--model", "simple_cnn", "--strategy",
                 "finetune", "--epochs", "1", "--batch-size", "32", "--image-size", "32", "--num-workers", "0",
                 "--no-progress"])
    assert code == 0
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == 400
