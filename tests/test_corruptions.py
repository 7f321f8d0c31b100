"""Damaged photos (#17): each kind of damage does what it says, deterministically; evaluate --corruptions writes its
table and plot; the head trains on damaged views' cached features."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from conftest import colour_image, make_kaggle_folder
from PIL import Image, ImageFilter

from catdog.training import corruptions
from catdog.training.corruptions import KINDS, SEVERITIES, damage, training_damage


def photo(size=(120, 90), seed=0) -> Image.Image:
    """A photo-like test image: smooth gradients with edges, so blur and JPEG have something to change."""
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    pixels = np.stack([(x * 255 / size[0]), (y * 255 / size[1]), 128 + 100 * np.sign(np.sin(x / 6.0) * np.cos(y / 5.0))], -1)
    pixels += np.random.default_rng(seed).normal(0, 8, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def sharpness(image: Image.Image) -> float:
    return float(pixels(image.convert("L").filter(ImageFilter.FIND_EDGES)).var())


def test_the_strong_severities_are_at_least_the_issues_floors():
    assert SEVERITIES["jpeg"].strong <= 15 and SEVERITIES["thumbnail"].strong <= 100
    assert SEVERITIES["blur"].strong >= 0.008 and SEVERITIES["dark"].strong <= 0.35
    assert SEVERITIES["noise"].strong >= 25 and SEVERITIES["screenshot"].strong <= 0.55
    assert SEVERITIES["sideways"].strong % 180 == 90 and SEVERITIES["sideways"].mild % 180 == 90
    assert set(SEVERITIES) == set(KINDS) == set(corruptions.TRAINING_RANGES)
    for kind, levels in SEVERITIES.items():
        assert levels.mild != levels.strong or kind == "sideways", kind
        low, high = corruptions.TRAINING_RANGES[kind]
        assert low <= min(levels.mild, levels.strong) and max(levels.mild, levels.strong) <= high, kind  # never one setting
    assert len(corruptions.conditions()) == 2 * len(KINDS)


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_is_deterministic_per_photo_and_changes_it(kind):
    image = photo(size=(240, 180))  # larger than the mild thumbnail
    for severity in (SEVERITIES[kind].mild, SEVERITIES[kind].strong):
        first, again = damage(image, kind, severity, "digest-a"), damage(image, kind, severity, "digest-a")
        assert first.mode == "RGB" and np.array_equal(pixels(first), pixels(again))
        assert first.size != image.size or not np.array_equal(pixels(first), pixels(image))
    if kind in ("noise", "screenshot"):  # the random kinds differ between photos (keys)
        other = damage(image, kind, SEVERITIES[kind].strong, "digest-b")
        assert not np.array_equal(pixels(other), pixels(damage(image, kind, SEVERITIES[kind].strong, "digest-a")))


def test_each_kind_changes_the_photo_as_stated():
    image = photo()
    original = pixels(image)
    # JPEG: the lower the quality, the further from the photo
    errors = [np.abs(pixels(damage(image, "jpeg", quality, 0)) - original).mean() for quality in (30, 10)]
    assert 0 < errors[0] < errors[1]
    # thumbnail: the short side is the severity, the aspect ratio kept
    small = damage(image, "thumbnail", 60, 0)
    assert min(small.size) == 60 and small.size == (80, 60)
    assert damage(image, "thumbnail", 500, 0).size == image.size  # never enlarged
    # blur: a Gaussian of the stated share of the short side
    blurred = damage(image, "blur", 0.02, 0)
    assert np.array_equal(pixels(blurred), pixels(image.filter(ImageFilter.GaussianBlur(0.02 * 90))))
    assert sharpness(blurred) < sharpness(damage(image, "blur", 0.005, 0)) < sharpness(image)
    # grey: no colour at 1, half of it at 0.5
    grey = pixels(damage(image, "grey", 1.0, 0))
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    half = pixels(damage(image, "grey", 0.5, 0))
    spread = lambda array: np.abs(array - array.mean(axis=-1, keepdims=True)).mean()  # noqa: E731
    assert spread(half) == pytest.approx(spread(original) / 2, rel=0.05)
    # dark: every value times the factor
    assert np.abs(pixels(damage(image, "dark", 0.35, 0)) - original * 0.35).max() <= 0.5 + 1e-4  # rounded to 8 bits
    # noise: Gaussian of the stated sigma (on mid-grey, nothing clipped)
    flat = Image.new("RGB", (100, 100), (128, 128, 128))
    assert (pixels(damage(flat, "noise", 30, 0)) - 128).std() == pytest.approx(30, rel=0.05)
    # screenshot: the photo, untouched, at the stated share of a 16:10 page's width, inside the centred square
    page = damage(image, "screenshot", 0.45, "key")
    assert page.size[0] == round(120 / 0.45) and page.size[1] == round(page.size[0] * 10 / 16)
    array, found = pixels(page), None
    for top in range(page.size[1] - 90 + 1):
        for left in range(page.size[0] - 120 + 1):
            if np.array_equal(array[top : top + 90, left : left + 120], original):
                found = (left, top)
    assert found is not None
    side = min(page.size)
    assert (page.size[0] - side) // 2 <= found[0] and found[0] + 120 <= (page.size[0] + side) // 2
    # sideways: a quarter turn, no EXIF
    assert np.array_equal(pixels(damage(image, "sideways", 90, 0)), pixels(image.transpose(Image.Transpose.ROTATE_90)))
    assert damage(image, "sideways", 270, 0).size == (90, 120)


def test_training_damage_draws_a_kind_per_photo_and_view_reproducibly():
    image = photo()
    draws = [training_damage(image, f"photo-{n}", "damaged-1")[1:] for n in range(64)]
    assert len({kind for kind, _ in draws}) == len(KINDS)  # every kind turns up
    for kind, severity in draws:
        low, high = corruptions.TRAINING_RANGES[kind]
        assert low <= severity <= high
    first, kind, severity = training_damage(image, "photo-0", "damaged-1")
    assert np.array_equal(pixels(first), pixels(training_damage(image, "photo-0", "damaged-1")[0]))
    assert [training_damage(image, "photo-0", f"damaged-{n}")[1:] for n in (1, 2, 3)] != [(kind, severity)] * 3


def test_damaged_views_have_their_own_cache_folders_and_clean_ones_keep_theirs(tmp_path):
    from catdog.training.features import cache_folder, split_view
    from catdog.runtime.transforms import EVAL_TRANSFORM_VERSION, Preprocess

    preprocess = Preprocess(input_size=64)
    settings = json.dumps({"model": "m", "preprocess": preprocess.to_dict(), "view": "original",
                           "transform": EVAL_TRANSFORM_VERSION}, sort_keys=True)
    assert cache_folder(tmp_path, "m", preprocess, "original").name == f"m-original-{hashlib.sha1(settings.encode()).hexdigest()[:12]}"
    names = {cache_folder(tmp_path, "m", preprocess, view).name for view in ("original", "flipped", "jpeg@10", "jpeg@10+flipped", "jpeg@30", "damaged-1")}
    assert len(names) == 6
    assert split_view("blur@0.012+flipped") == ("blur@0.012", 0, True) and split_view("damaged-2") == ("damaged-2", 0, False)
    assert split_view("blur@0.012+turned90+flipped") == ("blur@0.012", 1, True)
    assert split_view("original+turned270") == ("clean", 3, False) and split_view("flipped") == ("clean", 0, True)
    with pytest.raises(ValueError):
        split_view("smudge@3")


def test_a_damaged_view_is_the_backbone_on_the_damaged_photo(tmp_path):
    import torch

    from catdog.training.features import extract_features, file_digest
    from catdog.runtime.transforms import Preprocess, eval_transform

    path = tmp_path / "cat.0.jpg"
    colour_image(0, 0, size=(64, 48)).save(path)
    preprocess = Preprocess(input_size=32)

    def backbone():  # the mean of each channel: enough to see which pixels went in
        return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    features = extract_features([path], backbone, "probe", preprocess, ("original", "dark@0.35", "dark@0.35+flipped"),
                                backend="torch", cache_dir=tmp_path / "cache", num_workers=0).features[0]
    from catdog.runtime.images import load_image

    expected = eval_transform(preprocess)(damage(load_image(path), "dark", 0.35, file_digest(path))).mean(axis=(1, 2))
    assert np.allclose(features[1], expected, atol=1e-2) and np.allclose(features[2], expected, atol=1e-2)
    assert not np.allclose(features[0], features[1], atol=1e-2)
    again = extract_features([path], backbone, "probe", preprocess, ("dark@0.35",), backend="torch",
                             cache_dir=tmp_path / "cache", num_workers=0)
    assert again.computed == 0 and np.array_equal(again.features[0, 0], features[1])  # cached


def test_the_head_trains_on_damaged_views(tmp_path):
    from catdog.training.train import TrainConfig, train

    data = make_kaggle_folder(tmp_path / "train", per_class=10)
    common = dict(data=str(data), model="efficientnet_lite0", strategy="head", epochs=5, num_workers=0, progress=False,
                  image_size=64, cache_dir=str(tmp_path / "cache"))
    messages = []
    result = train(TrainConfig(out=str(tmp_path / "run"), damage_views=1.5, **common), log=messages.append)
    # 16 training photos: one damaged view each and a second one for half of them
    assert any(m.startswith("damaged views: 24 features of damaged training photos (1.5 per photo; 24 computed)") for m in messages), messages
    assert json.loads((tmp_path / "run" / "config.json").read_text())["damage_views"] == 1.5
    folders = sorted(path.name.split("-")[1:3] for path in (tmp_path / "cache" / "features").iterdir())
    assert ["damaged", "1"] in folders and ["damaged", "2"] in folders
    assert result.meta.tta is True  # validation is clean photos with their mirror images, as before
    again = []
    train(TrainConfig(out=str(tmp_path / "again"), damage_views=1.5, **common), log=again.append)
    assert any("(1.5 per photo; 0 computed)" in m for m in again), again
    with pytest.raises(ValueError):
        TrainConfig(data="x", damage_views=-1)


@pytest.fixture(scope="module")
def tiny_head_run(tmp_path_factory):
    from catdog.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("corruptions")
    data = make_kaggle_folder(root / "train", per_class=8)
    train(TrainConfig(data=str(data), out=str(root / "run"), model="efficientnet_lite0", strategy="head", epochs=5,
                      num_workers=0, progress=False, image_size=64, damage_views=0), log=lambda _: None)
    return root / "run"


def test_evaluate_corruptions_writes_the_table_and_the_plot(tiny_head_run, tmp_path):
    from catdog.cli import main

    out = tmp_path / "evaluation"
    assert main(["evaluate", "--run", str(tiny_head_run), "--out", str(out), "--corruptions"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    table = metrics["corruptions"]
    assert (out / "corruptions.png").stat().st_size > 1000
    assert table["photos"] == table["clean"]["count"] == metrics["count"] == 4  # the validation split
    assert {(row["kind"], row["level"]) for row in table["conditions"]} == {(k, level) for k in KINDS for level in ("strong", "mild")}
    for row in table["conditions"]:
        assert 0 <= row["accuracy"] <= 1 and row["log_loss"] >= 0 and row["count"] == 4
        assert row["severity"] == getattr(SEVERITIES[row["kind"]], row["level"])
    assert table["strong_summary"]["min_accuracy"] <= table["strong_summary"]["mean_accuracy"]
    # The predictor on damaged images gives the cached features' figures (the same damage, seeded by content).
    through_network = tmp_path / "network"
    assert main(["evaluate", "--run", str(tiny_head_run), "--out", str(through_network), "--corruptions",
                 "--no-feature-cache", "--tta"]) == 0
    assert main(["evaluate", "--run", str(tiny_head_run), "--out", str(tmp_path / "all"), "--corruptions", "--tta"]) == 0
    network = json.loads((through_network / "metrics.json").read_text())["corruptions"]
    cached = json.loads((tmp_path / "all" / "metrics.json").read_text())["corruptions"]
    for mine, theirs in zip(cached["conditions"], network["conditions"]):
        assert mine["accuracy"] == theirs["accuracy"] and mine["log_loss"] == pytest.approx(theirs["log_loss"], abs=2e-3), mine


def test_a_turned_view_is_the_backbone_on_the_turned_tensor(tmp_path):
    import torch

    from catdog.training.features import extract_features, file_digest
    from catdog.runtime.images import load_image
    from catdog.runtime.transforms import Preprocess, eval_transform

    path = tmp_path / "cat.0.jpg"
    colour_image(0, 0, size=(64, 48)).save(path)
    preprocess = Preprocess(input_size=32)

    def backbone():  # each channel's mean over each quadrant: enough to see which way up the pixels went in
        return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())

    views = ("original", "original+turned90", "dark@0.35+turned270+flipped")
    features = extract_features([path], backbone, "probe", preprocess, views, backend="torch",
                                cache_dir=tmp_path / "cache", num_workers=0).features[0]
    clean = eval_transform(preprocess)(load_image(path))
    dark = eval_transform(preprocess)(damage(load_image(path), "dark", 0.35, file_digest(path)))

    def quadrants(array):
        return torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(array))[None], 2).flatten().numpy()

    # The predictor turns a preprocessed batch with NumPy's rot90 over (rows, columns): the same turn.
    assert np.allclose(features[1], quadrants(np.rot90(clean, 1, axes=(1, 2))), atol=1e-2)
    assert np.allclose(features[2], quadrants(np.rot90(dark, 3, axes=(1, 2))[..., ::-1]), atol=1e-2)
    assert not np.allclose(features[0], features[1], atol=1e-2)


def test_the_cached_features_and_the_predictor_turn_the_same_photos(tiny_head_run, tmp_path, monkeypatch):
    from catdog.cli import main
    from catdog.runtime.probabilities import OrientationCheck

    def scores(name: str, *options: str) -> list[tuple[float, float]]:
        assert main(["evaluate", "--run", str(tiny_head_run), "--out", str(tmp_path / name), "--corruptions", *options]) == 0
        table = json.loads((tmp_path / name / "metrics.json").read_text())["corruptions"]
        return [(row["accuracy"], row["log_loss"]) for row in [table["clean"], *table["conditions"]]]

    unchecked = scores("unchecked", "--no-check-orientation")
    # Every photo checked, and the most typical turn taken whenever it is surer: on 4 photos of a tiny run the
    # shipped rule would check none of them.
    monkeypatch.setattr(OrientationCheck, "from_validation_scores",
                        classmethod(lambda cls, validation_scores, ood_threshold: cls(-1e9, 1e9, -1e9)))
    cached, network = scores("cached", "--check-orientation"), scores("network", "--no-feature-cache", "--check-orientation")
    assert cached != unchecked  # some photos were read turned
    for mine, theirs in zip(cached, network):
        assert mine[0] == theirs[0] and mine[1] == pytest.approx(theirs[1], abs=2e-3)
