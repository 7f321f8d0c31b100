"""Messy real-world files through the loader, predict, train and audit; SIGKILL during training, then resume."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import colour_image
from PIL import Image
from test_images import png_claiming

from catdog.training.audit import AuditConfig, audit
from catdog.cli import main
from catdog.runtime.images import ImageLoadError, load_image
from catdog.runtime.predict import EXIT_SOME_FILES_FAILED

BAD = {
    "zero-byte.jpg": "empty file",
    "truncated.jpg": None,
    "page.jpg": "not an image or unsupported format",
    "random.jpg": "not an image or unsupported format",
    "header-only.jpg": None,
    "bomb.png": "too many pixels",
}


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def make_messy_corpus(folder: Path, label: int = 0) -> dict[str, str | None]:
    """At least 20 kinds of file; returns name -> expected loader error reason (None: any loader error), for the
    bad ones. Every other file must load."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = colour_image(label, 11, (120, 90))
    (folder / "zero-byte.jpg").write_bytes(b"")
    whole = jpeg_bytes(Image.effect_noise((300, 300), 60).convert("RGB"))
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (folder / "page.jpg").write_text("<!doctype html><html><body>404</body></html>")
    (folder / "random.jpg").write_bytes(np.random.default_rng(1).bytes(3000))
    (folder / "header-only.jpg").write_bytes(whole[:200])
    (folder / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(folder / "palette.png", transparency=0)
    Image.fromarray((np.asarray(photo.convert("L"), dtype=np.uint16) * 257)).save(folder / "sixteen-bit.png")
    photo.convert("1").save(folder / "one-bit.png")
    photo.convert("L").save(folder / "gray.jpg")
    exif = Image.Exif()
    exif[0x0112] = 8
    photo.save(folder / "exif-rotated.jpg", exif=exif.tobytes())
    photo.save(folder / "progressive.jpg", progressive=True)
    frames = [photo, colour_image(label, 12, (120, 90))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    photo.save(folder / "photo.webp")
    photo.save(folder / "photo.bmp")
    photo.save(folder / "photo.tiff")
    photo.resize((2, 2)).save(folder / "two-by-two.png")
    photo.resize((3000, 40)).save(folder / "wide-3000x40.jpg")
    photo.save(folder / "UPPER.JPG")
    photo.save(folder / "chat noir é 猫.jpg")
    (folder / "copy-of-photo.bmp").write_bytes((folder / "photo.bmp").read_bytes())  # an exact duplicate
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "folder.jpg").mkdir()
    return BAD


def test_corpus_through_the_loader(tmp_path):
    bad = make_messy_corpus(tmp_path)
    files = [p for p in tmp_path.iterdir() if p.is_file() and not p.name.startswith(".")]
    assert len(files) >= 22
    for path in files:
        if path.name in bad:
            with pytest.raises(ImageLoadError) as raised:
                load_image(path)
            assert str(path) in str(raised.value)
            if bad[path.name]:
                assert raised.value.reason == bad[path.name], path.name
        else:
            image = load_image(path)
            assert image.mode == "RGB", path.name
    assert load_image(tmp_path / "exif-rotated.jpg").size == (90, 120)


def test_predict_on_a_messy_folder(tmp_path):
    bad = make_messy_corpus(tmp_path / "inbox")
    os.symlink("/etc/hostname", tmp_path / "inbox" / "outside-link.jpg")
    output = tmp_path / "preds.csv"
    code = main(["predict", str(tmp_path / "inbox"), "--run", "", "--output", str(output), "--no-progress", "--backend", "torch"])
    assert code == EXIT_SOME_FILES_FAILED
    predicted = {Path(row["path"]).name for row in csv.DictReader(open(output))}
    errors = {Path(row["path"]).name: row["reason"] for row in csv.DictReader(open(tmp_path / "preds.errors.csv"))}
    assert set(bad) <= set(errors)
    assert "outside-link.jpg" in errors and "folder.jpg" in errors  # reported on purpose, never read
    assert ".DS_Store" not in errors and ".DS_Store" not in predicted
    good = {p.name for p in (tmp_path / "inbox").iterdir() if p.is_file() and not p.is_symlink() and not p.name.startswith(".")} - set(bad)
    assert predicted == good and len(good) >= 16


def test_train_survives_the_corpus(tmp_path):
    data = tmp_path / "data"
    make_messy_corpus(data / "cat", label=0)
    make_messy_corpus(data / "dog", label=1)
    for label, name in enumerate(("cat", "dog")):
        for i in range(6):
            colour_image(label, 100 + i).save(data / name / f"extra-{i}.jpg")
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--model", "simple_cnn", "--strategy",
                 "finetune", "--epochs", "1", "--batch-size", "8", "--image-size", "32", "--num-workers", "1", "--no-progress"])
    assert code == 0
    skipped = {Path(row["path"]).name for row in csv.DictReader(open(tmp_path / "run" / "skipped_files.csv"))}
    assert set(BAD) <= skipped


def test_audit_reports_every_kind(tmp_path):
    make_messy_corpus(tmp_path / "cat", 0)
    make_messy_corpus(tmp_path / "dog", 1)
    report = audit(AuditConfig(data=str(tmp_path), out=str(tmp_path / "audit-out")), log=lambda _: None)
    reasons = {Path(e["path"]).name: e["reason"] for e in report["errors"] if "/cat/" in e["path"]}
    for name, reason in BAD.items():
        assert name in reasons and (reason is None or reasons[name] == reason)
    notes = {Path(n["path"]).name: " ".join(n["notes"]) for n in report["notes"] if "/cat/" in n["path"]}
    assert "CMYK" in notes["cmyk.jpg"] and "transparency" in notes["rgba.png"] and "16-bit" in notes["sixteen-bit.png"]
    assert "1-bit" in notes["one-bit.png"] and "grayscale" in notes["gray.jpg"] and "EXIF-rotated" in notes["exif-rotated.jpg"]
    assert "animated" in notes["animated.gif"] and "tiny" in notes["two-by-two.png"] and "palette" in notes["palette.png"]
    exact = [sorted(Path(f).name for f in group["files"]) for group in report["exact_duplicates"]]
    assert ["copy-of-photo.bmp", "photo.bmp"] in exact
    # The same generated photos sit in both class folders: near/exact duplicates across classes are label conflicts.
    assert report["label_conflicts"] > 0
    quarantine = (tmp_path / "audit-out" / "quarantine.txt").read_text()
    assert "zero-byte.jpg" in quarantine and "photo.bmp" not in quarantine


def test_train_reuses_a_current_audit(tmp_path):
    from conftest import make_kaggle_folder

    data = make_kaggle_folder(tmp_path / "train", per_class=8)
    (data / "cat.100.jpg").write_text("not a jpeg")
    audit(AuditConfig(data=str(data), out=str(tmp_path / "a")), log=lambda _: None)
    messages = []
    from catdog.training.train import TrainConfig, train

    train(TrainConfig(data=str(data), out=str(tmp_path / "run"), model="simple_cnn", strategy="finetune", epochs=1,
                      batch_size=8, image_size=32, num_workers=0, progress=False), log=messages.append)
    assert any("skipping 1 files that the current audit flagged" in m for m in messages)


def train_command(data: Path, out: Path, epochs: int, resume: bool = False) -> list[str]:
    if resume:
        return [sys.executable, "-m", "catdog.cli", "train", "--resume", str(out), "--no-progress"]
    return [sys.executable, "-m", "catdog.cli", "train", "--data", str(data), "--out", str(out), "--model", "simple_cnn",
            "--strategy", "finetune", "--epochs", str(epochs), "--batch-size", "8", "--image-size", "48",
            "--num-workers", "0", "--early-stopping", "0", "--no-progress", "--seed", "5"]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    from conftest import make_kaggle_folder

    from catdog.training.checkpoint import load_model, load_training_state

    from catdog.runtime.runs import LAST_CHECKPOINT_FILE

    data = make_kaggle_folder(tmp_path / "train", per_class=24, size=(96, 72))
    epochs = 6
    subprocess.run(train_command(data, tmp_path / "full", epochs), check=True, capture_output=True)
    victim = subprocess.Popen(train_command(data, tmp_path / "killed", epochs), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = tmp_path / "killed" / "history.csv"
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        if history.exists() and len(history.read_text().splitlines()) >= 3:  # header + two epochs
            break
        time.sleep(0.05)
    assert victim.poll() is None, "training finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    state = load_training_state(tmp_path / "killed" / LAST_CHECKPOINT_FILE)  # still loadable after SIGKILL
    assert 1 <= state["epoch"] + 1 < epochs
    load_model(tmp_path / "killed")  # the best model so far is loadable too
    subprocess.run(train_command(data, tmp_path / "killed", epochs, resume=True), check=True, capture_output=True)
    full = list(csv.DictReader(open(tmp_path / "full" / "history.csv")))
    resumed = list(csv.DictReader(open(tmp_path / "killed" / "history.csv")))
    assert [r["epoch"] for r in resumed] == [str(e) for e in range(1, epochs + 1)]
    for a, b in zip(full, resumed):
        assert float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), abs=1e-5)
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), abs=1e-5)
    full_meta = json.loads((tmp_path / "full" / "meta.json").read_text())
    resumed_meta = json.loads((tmp_path / "killed" / "meta.json").read_text())
    assert full_meta["metrics"] == pytest.approx(resumed_meta["metrics"], abs=1e-6)
