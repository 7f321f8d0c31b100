"""Likely label errors (`catdog data issues`) and leaving listed photos out of training (`train --exclude`)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import make_kaggle_folder

from catdog.cli import main
from catdog.runtime.data import DataError, discover
from catdog.training.exclusions import exclude_listed, read_exclusion_list
from catdog.training.label_issues import CSV_COLUMNS, out_of_fold_probabilities, rank_label_issues
from catdog.training.train import TrainConfig, train


def read_csv(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def flipped_label_manifest(shared_data, folder, per_class=300, flipped=12, seed=0):
    """A CSV manifest of `per_class` shared cat and dog photos each, `flipped` of them with the wrong label."""
    generator = np.random.default_rng(seed)
    photos = sorted((shared_data / "train").glob("*.jpg"))
    chosen = []
    for name in ("cat", "dog"):
        of_class = [p for p in photos if p.name.startswith(name + ".")]
        chosen += [(p, name) for p in generator.choice(of_class, per_class, replace=False)]
    wrong = set(generator.choice(len(chosen), flipped, replace=False).tolist())
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "label"])
        for index, (path, label) in enumerate(chosen):
            writer.writerow([str(path), ({"cat": "dog", "dog": "cat"}[label] if index in wrong else label)])
    return manifest, {chosen[i][0].name for i in wrong}


@pytest.mark.slow
@pytest.mark.shared_data
def test_flipped_labels_of_shared_photos_rank_near_the_top(shared_data, tmp_path):
    manifest, flipped = flipped_label_manifest(shared_data, tmp_path / "data")
    output = tmp_path / "issues" / "label_issues.csv"
    assert main(["data", "issues", str(manifest), "--preset", "fast", "--output", str(output), "--no-progress"]) == 0
    rows = read_csv(output)
    assert list(rows[0]) == CSV_COLUMNS and len(rows) == 600
    top_30 = {row["path"].rsplit("/", 1)[-1] for row in rows[:30]}
    assert len(top_30 & flipped) >= 10, f"only {len(top_30 & flipped)} of 12 flipped labels in the top 30"
    for row in rows:
        if row["path"].rsplit("/", 1)[-1] in flipped and row in rows[:30]:
            assert row["suggested_label"] != row["given_label"]
    probabilities = [float(row["given_label_probability"]) for row in rows if row["label_issue"] == "0"]
    assert probabilities == sorted(probabilities)  # after the flagged rows: least believed first
    assert (output.with_suffix(".png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_out_of_fold_ranking_puts_wrong_labels_first():
    # Two well separated clusters of "features"; eight points carry the other cluster's label.
    generator = np.random.default_rng(0)
    labels = np.repeat([0, 1], 100)
    features = generator.normal(0, 1, (200, 16)) + np.where(labels[:, None] == 1, 3.0, -3.0)
    wrong = generator.choice(200, 8, replace=False)
    given = labels.copy()
    given[wrong] = 1 - given[wrong]
    probabilities = out_of_fold_probabilities(features, given, folds=5, seed=0)
    assert probabilities.shape == (200, 2) and np.allclose(probabilities.sum(axis=1), 1)
    order, flagged = rank_label_issues(given, probabilities)
    assert sorted(order) == list(range(200))
    assert set(order[:8]) == set(wrong.tolist())
    assert len(flagged) >= 4 and flagged <= set(wrong.tolist())  # confident learning flags no right label here
    believed = probabilities[np.arange(200), given]
    rest = [i for i in order if i not in flagged]
    assert list(believed[rest]) == sorted(believed[rest])


def test_exclusion_lists_label_issues_csv_and_plain_lists(tmp_path):
    data = make_kaggle_folder(tmp_path / "train", per_class=6)
    images = discover(data)
    issues = tmp_path / "label_issues.csv"
    issues.write_text("path,given_label,suggested_label,given_label_probability,label_issue\n"
                      "cat.1.jpg,cat,dog,0.01,1\ndog.2.jpg,dog,cat,0.02,1\ncat.3.jpg,cat,cat,0.9,0\n")
    assert read_exclusion_list(issues) == ["cat.1.jpg", "dog.2.jpg"]  # the flagged rows only
    kept, dropped, unmatched = exclude_listed(images, issues)
    assert sorted(p.name for p in dropped) == ["cat.1.jpg", "dog.2.jpg"] and not unmatched
    assert len(kept) == 10 and "cat.1.jpg" not in kept.relative_paths()
    # data audit's quarantine.txt: absolute path, a tab, the reason; a path that is not in the data is reported.
    quarantine = tmp_path / "quarantine.txt"
    quarantine.write_text(f"# bad files\n{data / 'dog.0.jpg'}\ttruncated\n\n{tmp_path / 'elsewhere.jpg'}\tempty file\n")
    kept, dropped, unmatched = exclude_listed(images, quarantine)
    assert [p.name for p in dropped] == ["dog.0.jpg"] and unmatched == [str(tmp_path / "elsewhere.jpg")]
    every_cat = tmp_path / "cats.txt"
    every_cat.write_text("".join(f"cat.{i}.jpg\n" for i in range(6)))
    with pytest.raises(DataError, match="every image of class"):
        exclude_listed(images, every_cat)
    with pytest.raises(DataError, match="no such exclusion list"):
        exclude_listed(images, tmp_path / "missing.txt")


@pytest.mark.slow
def test_train_exclude_leaves_the_listed_photos_out(tmp_path, capsys):
    data = make_kaggle_folder(tmp_path / "train", per_class=10)
    listed = tmp_path / "exclude.txt"
    listed.write_text("cat.0.jpg\ndog.9.jpg\n")
    messages = []
    config = TrainConfig(data=str(data), out=str(tmp_path / "run"), model="simple_cnn", strategy="finetune", epochs=1,
                         batch_size=8, image_size=32, num_workers=0, progress=False, exclude=str(listed))
    train(config, log=messages.append)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == 18
    assert not {"cat.0.jpg", "dog.9.jpg"} & set(split["train"] + split["val"])
    assert any("leaving out 2 files" in message for message in messages)
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "run2"), "--exclude", str(tmp_path / "nope.txt")])
    assert code == 1 and "nope.txt: no such exclusion list" in capsys.readouterr().err


def test_data_issues_rejects_bad_options(tmp_path, capsys):
    assert main(["data", "issues", str(tmp_path), "--folds", "1"]) == 2
    assert "--folds must be at least 2" in capsys.readouterr().err
    assert main(["data", "issues", str(tmp_path / "missing")]) == 1
    assert "no such file or folder" in capsys.readouterr().err
