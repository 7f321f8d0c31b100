"""`catdog report`: the numbers it states, and the page itself rendered offline in Chromium."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_kaggle_folder

from catdog.cli import main
from catdog.training.report import SECTIONS, most_confused_pairs, wilson_interval

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT_DIR = Path(__file__).resolve().parents[1] / "test-artifacts"


def test_wilson_interval_matches_the_formula():
    low, high = wilson_interval(45, 50)
    z, p, n = 1.959963984540054, 0.9, 50
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (low, high) == pytest.approx((centre - half, centre + half), abs=1e-9)
    assert wilson_interval(50, 50)[1] == pytest.approx(1.0) and wilson_interval(50, 50)[0] < 0.95  # never [1, 1]


def test_most_confused_pairs_are_sorted_off_diagonal_cells():
    matrix = [[10, 1, 4], [0, 9, 2], [3, 0, 8]]
    assert most_confused_pairs(matrix, ["a", "b", "c"]) == [("a", "c", 4), ("c", "a", 3), ("b", "c", 2), ("a", "b", 1)]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A small run with mistakes, a label_issues.csv from `catdog data issues`, and its report."""
    from catdog.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("report")
    data = make_kaggle_folder(root / "train", per_class=14)
    # Two photos of each class carry the other class's colour: the model gets them wrong, and they look mislabelled.
    for number, (kind, other) in enumerate((("cat", "dog"), ("cat", "dog"), ("dog", "cat"), ("dog", "cat"))):
        shutil.copy(data / f"{other}.{number}.jpg", data / f"{kind}.{100 + number}.jpg")
    run = root / "run"
    train(TrainConfig(data=str(data), out=str(run), model="simple_cnn", strategy="finetune", epochs=3, batch_size=8,
                      lr=3e-3, image_size=32, num_workers=0, progress=False, early_stopping=0, val_fraction=0.4),
          log=lambda _: None)
    assert main(["data", "issues", str(data), "--preset", "fast", "--folds", "3", "--output", str(run / "label_issues.csv"),
                 "--no-progress"]) == 0
    output = root / "report.html"
    assert main(["report", "--run", str(run), "--output", str(output), "--bootstrap", "200", "--device", "cpu"]) == 0
    return output, run, data


@pytest.mark.slow
def test_report_is_self_contained_and_states_the_evaluation(report):
    output, run, _ = report
    text = output.read_text()
    for key in SECTIONS:
        assert f'<section id="{key}">' in text
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", text)  # every image inline, no links out of the page
    assert "http://" not in text and "https://" not in text
    with open(run / "evaluation" / "predictions.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    accuracy = sum(row["label"] == row["predicted"] for row in rows) / len(rows)
    assert f"{accuracy:.4f}" in text  # the report states evaluate's figure, from evaluate's own files
    for row in rows:
        if row["label"] != row["predicted"]:
            assert row["path"] in text  # every mistake is shown (there are fewer than --mistakes)


@pytest.mark.slow
def test_report_in_chromium_shows_every_section(report):
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (make test installs it with apt-get when run as root)")
    pytest.importorskip("playwright")
    from playwright.sync_api import sync_playwright

    output, _, _ = report
    requests = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("request", lambda request: requests.append(request.url))
        page.goto(output.as_uri())
        page.wait_for_load_state("load")
        found = {}
        for key, title in SECTIONS.items():
            section = page.locator(f"section#{key}")
            found[key] = section.count() == 1 and section.locator("h2").inner_text() == title and section.is_visible()
        images = page.eval_on_selector_all("img", "images => images.map(i => [i.alt, i.complete && i.naturalWidth > 0])")
        photos = {key: page.locator(f"section#{key} figure.photo img").count() for key in ("samples", "mistakes", "label-issues")}
        plots = {key: page.locator(f"section#{key} img.plot").count() for key in ("training-curves", "roc", "calibration")}
        captions = page.locator("section#mistakes figcaption").all_inner_texts()
        SCREENSHOT_DIR.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT_DIR / "report.png"), full_page=True)
        browser.close()
    assert all(found.values()), found
    assert images and all(loaded for _, loaded in images), [alt for alt, loaded in images if not loaded]
    assert all(photos.values()) and all(plots.values()), (photos, plots)
    assert all(re.search(r"cat \d\.\d{3} · dog \d\.\d{3}", caption) for caption in captions)  # file name and probabilities
    assert [url for url in requests if not url.startswith(("file:", "data:"))] == []  # nothing fetched: works offline
    assert (SCREENSHOT_DIR / "report.png").stat().st_size > 20_000


def test_resampled_metrics_equal_scikit_learn():
    from sklearn.metrics import f1_score, log_loss, roc_auc_score

    from catdog.training.report import bootstrap_interval, resampled_metrics

    generator = np.random.default_rng(3)
    for classes in (2, 3):
        labels = generator.integers(0, classes, 300)
        logits = generator.normal(size=(300, classes)) + 1.5 * np.eye(classes)[labels]
        logits[:20] = np.round(logits[:20])  # some tied scores
        probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        metrics = resampled_metrics(labels, probabilities)
        rows = np.stack([np.arange(300), generator.integers(0, 300, 300)])  # the data itself, and one resample
        for row, values in zip(rows, zip(*(metrics[name](rows) for name in ("log_loss", "macro_f1", "roc_auc")))):
            truth, scores = labels[row], probabilities[row]
            expected_auc = (roc_auc_score(truth, scores[:, 1]) if classes == 2
                            else roc_auc_score(truth, scores, multi_class="ovr", labels=list(range(classes))))
            assert values == pytest.approx((log_loss(truth, scores, labels=list(range(classes))),
                                            f1_score(truth, scores.argmax(1), average="macro", labels=list(range(classes)), zero_division=0),
                                            expected_auc), abs=1e-9)
        low, high = bootstrap_interval(metrics["log_loss"], 300, 200, seed=0)
        assert low < metrics["log_loss"](rows[:1])[0] < high
