"""The run report: a valid, self-contained HTML page whose numbers are the run's numbers."""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, f1_score

from conftest import write_tiny_dataset
from mixcls.cli import main
from mixcls.report import (find_confident_mistakes, make_mix_examples, plot_confusion,
                           screenshot_report, write_report)

pytestmark = pytest.mark.slow

# Class names that break a page that does not escape: a script tag, an entity, quotes.
EVIL = ['<script>alert("x")</script>', "a&b 'q' \"dq\"", "<b>bold</b>"]
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRAIN = ["--model", "test_resnet", "--img-size", "16", "--batch-size", "8", "--workers", "0",
         "--no-progress"]


class PageParser(HTMLParser):
    """Checks that tags balance; collects tags, attributes, text, tables by id and captions."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str]] = []  # (tag, name, value)
        self.ids: set[str] = set()
        self.text: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.captions: dict[str, list[list[str]]] = {}  # grid id -> per card, its caption lines
        self._table = self._row = self._cell = self._grid = self._card = self._span = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        for name, value in attrs.items():
            self.attrs.append((tag, name, value or ""))
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "table":
            self._table = attrs.get("id")
            self.tables.setdefault(self._table, [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "div" and "grid" in (attrs.get("class") or ""):
            self._grid = attrs.get("id") or f"grid{len(self.captions)}"
            self.captions[self._grid] = []
        elif tag == "figcaption" and self._grid is not None:
            self._card = []
            self.captions[self._grid].append(self._card)
        elif tag == "span" and self._card is not None:
            self._span = []

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "span" and self._span is not None:
            self._card.append("".join(self._span))
            self._span = None
        elif tag == "figcaption":
            self._card = None

    def handle_data(self, data):
        self.text.append(data)
        for part in (self._cell, self._span):
            if part is not None:
                part.append(data)


def parse_page(path: Path) -> tuple[str, PageParser]:
    page = path.read_text()
    parser = PageParser()
    parser.feed(page)
    parser.close()
    assert not parser.errors, parser.errors[:5]
    assert not parser.stack, f"unclosed tags: {parser.stack}"
    return page, parser


def decode_png(uri: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix), uri[:60]
    try:
        data = base64.b64decode(uri[len(prefix):], validate=True)
    except binascii.Error as exc:
        raise AssertionError(f"not base64: {exc}") from None
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert image.format == "PNG" and min(image.size) > 0
    return data


def check_self_contained(page: str, parser: PageParser) -> list[bytes]:
    """Every img is an embedded PNG, links stay in the page; returns the decoded PNGs."""
    assert page.startswith("<!DOCTYPE html>")
    assert "script" not in parser.tags and "link" not in parser.tags
    lowered = page.lower()
    for needle in ("http:", "https:", "url(", "@import", "file:", "<script", "<iframe"):
        assert needle not in lowered, needle
    pngs = []
    for tag, name, value in parser.attrs:
        if name == "src":
            assert tag == "img"
            pngs.append(decode_png(value))
        if name == "href":
            assert value.startswith("#") and value[1:] in parser.ids, value
    assert len(pngs) == parser.tags.count("img")
    return pngs


def table(parser: PageParser, table_id: str) -> dict[str, list[str]]:
    """Rows of a table by their first cell (header row dropped)."""
    rows = parser.tables[table_id]
    return {row[0]: row[1:] for row in rows[1:]}


def evil_dataset(root: Path) -> Path:
    data = write_tiny_dataset(root, n_per_class=12, num_classes=3, seed=3)
    frame = pd.read_csv(data / "train.csv")
    frame["label"] = [EVIL[k] for k in frame["label"]]
    frame.to_csv(data / "train.csv", index=False)
    return data


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A full run (2 folds x 2 epochs, no mixing) and a partial one (fold 1 only, cutmix)."""
    root = tmp_path_factory.mktemp("report")
    data = evil_dataset(root / "data")
    full, partial = root / "full", root / "partial"
    assert main(["train", "--data", str(data), "--out", str(full), *TRAIN, "--folds", "2",
                 "--epochs", "2"]) == 0
    assert main(["train", "--data", str(data), "--out", str(partial), *TRAIN, "--folds", "2",
                 "--epochs", "1", "--train-folds", "1", "--mix", "cutmix"]) == 0
    return full, partial


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("*.pt"))
    (dest / "report.html").unlink()
    return dest


def test_train_writes_a_valid_self_contained_report(runs):
    full, _ = runs
    page, parser = parse_page(full / "report.html")  # written by mixcls train itself
    pngs = check_self_contained(page, parser)
    assert len(pngs) >= 3  # learning curves, confusion matrix, at least one wrong image
    for anchor in ("config", "cv", "curves", "classes", "mistakes"):
        assert anchor in parser.ids
    assert "mix" not in parser.ids and "suspects" not in parser.ids  # no mixing, no noise step


def test_cv_numbers_equal_metrics_and_oof(runs):
    full, _ = runs
    metrics = json.loads((full / "metrics.json").read_text())
    oof = pd.read_csv(full / "oof.csv")
    _, parser = parse_page(full / "report.html")
    summary = table(parser, "cv-summary")
    assert summary["CV accuracy"][0] == f"{metrics['cv_accuracy']:.4f}"
    assert summary["CV macro F1"][0] == f"{metrics['cv_macro_f1']:.4f}"
    # The page's numbers are also those of an independent recomputation from oof.csv.
    assert summary["CV accuracy"][0] == f"{(oof['label'] == oof['pred']).mean():.4f}"
    assert summary["CV macro F1"][0] == f"{f1_score(oof['label'], oof['pred'], average='macro'):.4f}"
    folds = table(parser, "cv-folds")
    assert sorted(folds) == ["fold 0", "fold 1"]
    for fold, group in oof.groupby("fold"):
        rows, accuracy = folds[f"fold {fold}"][:2]
        assert int(rows) == len(group)
        assert accuracy == f"{metrics['fold_accuracy'][str(fold)]:.4f}"
        assert accuracy == f"{(group['label'] == group['pred']).mean():.4f}"
        history = pd.read_csv(full / f"fold_{fold}" / "history.csv")
        assert int(folds[f"fold {fold}"][2]) == int(history.loc[history["valid_accuracy"].idxmax(), "epoch"])


def test_class_names_are_escaped_and_per_class_accuracy_is_right(runs):
    full, _ = runs
    page, parser = parse_page(full / "report.html")
    classes = json.loads((full / "classes.json").read_text())
    assert set(classes) == set(EVIL)
    assert "script" not in parser.tags and "b" not in parser.tags
    text = "".join(parser.text)
    for name in EVIL:
        assert name in text  # shown as text, exactly
    assert "&lt;script&gt;" in page
    oof = pd.read_csv(full / "oof.csv")
    cm = confusion_matrix(oof["label"], oof["pred"], labels=list(range(len(classes))))
    per_class = table(parser, "class-accuracy")
    precision, recall, f1, _ = precision_recall_fscore_support(
        oof["label"], oof["pred"], labels=list(range(len(classes))), zero_division=0)
    for k, name in enumerate(classes):
        rows, correct, accuracy, shown_precision, shown_f1 = per_class[name][:5]
        assert (int(rows), int(correct)) == (cm[k].sum(), cm[k, k])
        assert accuracy == f"{cm[k, k] / cm[k].sum():.4f}" == f"{recall[k]:.4f}"
        assert shown_f1 == f"{f1[k]:.4f}"
        assert shown_precision == (f"{precision[k]:.4f}" if cm[:, k].sum() else "—")
    metrics = json.loads((full / "metrics.json").read_text())
    assert np.mean(f1) == pytest.approx(metrics["cv_macro_f1"])  # the CV's macro F1 is their mean


def test_confidently_wrong_images_are_the_top_wrong_oof_rows(runs):
    full, _ = runs
    oof = pd.read_csv(full / "oof.csv", dtype={"image_id": str})
    classes = json.loads((full / "classes.json").read_text())
    _, parser = parse_page(full / "report.html")
    wrong = oof[oof["pred"] != oof["label"]].copy()
    wrong["p"] = [row[f"prob_{row['pred']}"] for _, row in wrong.iterrows()]
    wrong = wrong.sort_values("p", ascending=False, kind="mergesort").head(12)
    expected = [[f"given {classes[r.label]} → predicted {classes[r.pred]} ({r.p:.2f})",
                 f"{r.image_id} · fold {r.fold}"] for r in wrong.itertuples()]
    assert len(expected) > 0
    assert parser.captions["mistakes-grid"] == expected


def test_partial_run_with_mixing(runs):
    _, partial = runs
    page, parser = parse_page(partial / "report.html")
    check_self_contained(page, parser)
    folds = table(parser, "cv-folds")
    assert folds["fold 0"][1] == "not trained"
    metrics = json.loads((partial / "metrics.json").read_text())
    assert folds["fold 1"][1] == f"{metrics['fold_accuracy']['1']:.4f}"
    assert "mix" in parser.ids and "cutmix" in "".join(parser.text)
    classes = json.loads((partial / "classes.json").read_text())
    mix_cards = [card for grid, cards in parser.captions.items() if grid.startswith("grid") for card in cards]
    assert len(mix_cards) == 12
    for first, _ids in mix_cards:
        parts = [re.fullmatch(r"(\d\.\d\d) (.+)", p, flags=re.S) for p in first.split(" + ")]
        assert all(parts) and {p.group(2) for p in parts} <= set(classes)
        assert sum(float(p.group(1)) for p in parts) == pytest.approx(1.0, abs=0.011)


def test_make_mix_examples_cutmix_pastes_whole_pixels():
    rng = np.random.default_rng()
    images = rng.integers(0, 256, (8, 20, 20, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 8)
    batches = make_mix_examples(images, labels, num_classes=4, mix={"method": "cutmix", "alpha": 1.0},
                                n_batches=2, seed=int(rng.integers(1 << 31)))
    for b, batch in enumerate(batches):
        x = images[b * 4:(b + 1) * 4]
        y = labels[b * 4:(b + 1) * 4]
        for i, j in enumerate(batch["perm"]):
            mixed = batch["mixed"][i]
            from_i = (mixed == x[i]).all(axis=2)
            assert (from_i | (mixed == x[j]).all(axis=2)).all()  # every pixel from one of the two
            target = np.zeros(4)
            np.add.at(target, [y[i], y[j]], [from_i.mean(), 1 - from_i.mean()])
            if j != i and not (x[i] == x[j]).all(axis=2).any():
                np.testing.assert_allclose(batch["soft_targets"][i], target, atol=1e-6)


def test_suspects_from_the_noise_step_are_embedded(runs, tmp_path):
    full, _ = runs
    run = copy_run(full, tmp_path / "run")
    assert main(["noise", "--run", str(run), "--out", str(run / "suspects.csv"),
                 "--gallery", str(run / "suspects.png")]) == 0
    assert main(["report", str(run)]) == 0
    page, parser = parse_page(run / "report.html")
    pngs = check_self_contained(page, parser)
    assert (run / "suspects.png").read_bytes() in pngs
    suspects = pd.read_csv(run / "suspects.csv", dtype={"image_id": str})
    assert "suspects" in parser.ids and f"{len(suspects)} suspect label(s)" in "".join(parser.text)
    if len(suspects):
        shown = parser.tables["suspects"]
        assert len(shown) - 1 == min(12, len(suspects))
        header = shown[0]
        first = dict(zip(header, shown[1]))
        columns = ["image_id", "given", "suggested"]
        assert [first[c] for c in columns] == [str(v) for v in suspects.iloc[0][columns]]
    # Without the gallery picture, the report draws the suspects itself.
    (run / "suspects.png").unlink()
    assert main(["report", str(run)]) == 0
    _, parser = parse_page(run / "report.html")
    cards = [c for grid, cs in parser.captions.items() if grid != "mistakes-grid" for c in cs]
    assert len(cards) == min(12, len(suspects))


def test_report_without_history_or_images(runs, tmp_path):
    full, _ = runs
    run = copy_run(full, tmp_path / "run")
    for path in run.glob("fold_*/history.csv"):
        path.unlink()
    dataset = json.loads((run / "dataset.json").read_text())
    (run / "dataset.json").write_text(json.dumps(dict(dataset, images=str(tmp_path / "gone"))))
    page, parser = parse_page(write_report(run))
    check_self_contained(page, parser)
    text = "".join(parser.text)
    assert "No fold_K/history.csv" in text and "images folder not found" in text
    assert table(parser, "cv-folds")["fold 0"][2] == "—"  # best epoch unknown without history


def test_settings_name_the_column_the_folds_were_grouped_by(runs, tmp_path):
    full, _ = runs
    run = copy_run(full, tmp_path / "run")
    text = "".join(parse_page(write_report(run))[1].text)
    assert "folds grouped by" not in text
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump(dict(config, group_col="plant")))
    text = "".join(parse_page(write_report(run))[1].text)
    assert "folds grouped byplant" in text  # a <dt> and its <dd>, joined


def test_report_command_rebuilds_and_rejects_other_folders(runs, tmp_path, capsys):
    full, _ = runs
    run = copy_run(full, tmp_path / "run")
    assert main(["report", str(run)]) == 0
    assert "wrote" in capsys.readouterr().out
    parse_page(run / "report.html")
    other = tmp_path / "notarun"
    other.mkdir()
    (other / "config.yaml").write_text("model: x\n")
    assert main(["report", str(other)]) == 2
    err = capsys.readouterr().err
    assert "not a finished run folder" in err and "metrics.json" in err and "oof.csv" in err
    assert sorted(p.name for p in other.iterdir()) == ["config.yaml"]  # nothing written
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (run / "oof.csv").write_text("image_id,label\nx.png,0\n")
    assert main(["report", str(run)]) == 2
    assert "oof.csv" in capsys.readouterr().err


def make_synthetic_run(root: Path, *, num_classes: int, n: int, seed: int) -> Path:
    """A run folder without history, images or checkpoints: many classes, names with markup."""
    rng = np.random.default_rng(seed)
    classes = [f"<i>class {k}</i> & co" for k in range(num_classes)]
    labels = rng.integers(0, num_classes, n)
    probs = rng.dirichlet(np.full(num_classes, 0.3), n)
    probs[np.arange(n), labels] += rng.random(n)  # better than chance
    probs /= probs.sum(axis=1, keepdims=True)
    folds = rng.integers(0, 3, n)
    pred = probs.argmax(1)
    oof = pd.DataFrame({"image_id": [f"img_{i}.png" for i in range(n)], "label": labels, "fold": folds,
                        "pred": pred})
    for k in range(num_classes):
        oof[f"prob_{k}"] = probs[:, k]
    root.mkdir(parents=True)
    oof.to_csv(root / "oof.csv", index=False)
    (root / "classes.json").write_text(json.dumps(classes))
    (root / "config.yaml").write_text(yaml.safe_dump({"model": "resnet18", "folds": 3, "img_size": 64}))
    cm = confusion_matrix(labels, pred, labels=list(range(num_classes)))
    (root / "metrics.json").write_text(json.dumps({
        "cv_accuracy": float((labels == pred).mean()),
        "cv_macro_f1": float(f1_score(labels, pred, average="macro", labels=list(range(num_classes)),
                                      zero_division=0)),
        "fold_accuracy": {str(f): float((labels[folds == f] == pred[folds == f]).mean()) for f in range(3)},
        "confusion": cm.tolist(), "holdout_accuracy": float(rng.random()), "holdout_rows": 10}))
    return root


@pytest.mark.parametrize("seed", [0, 55])  # seed 55 draws no row of one of the 45 classes
def test_many_classes_synthetic_run(tmp_path, seed):
    run = make_synthetic_run(tmp_path / "run", num_classes=45, n=400, seed=seed)
    page, parser = parse_page(write_report(run))
    check_self_contained(page, parser)
    metrics = json.loads((run / "metrics.json").read_text())
    summary = table(parser, "cv-summary")
    assert summary["holdout accuracy"][0] == f"{metrics['holdout_accuracy']:.4f}"
    assert summary["CV accuracy"][0] == f"{metrics['cv_accuracy']:.4f}"
    per_class = table(parser, "class-accuracy")
    assert len(per_class) == 30  # capped: the worst 30 of 45
    cm = np.asarray(metrics["confusion"])
    given = cm.sum(axis=1)
    # a class without rows (possible with 400 random labels over 45 classes) has no accuracy:
    # shown as "—" and ranked after every class that has one
    accuracy = np.sort(np.diag(cm)[given > 0] / given[given > 0])
    values = [v[2] for v in per_class.values()]
    shown = sorted(float(v) for v in values if v != "—")
    assert len(shown) == min(30, int((given > 0).sum()))
    assert values.count("—") == 30 - len(shown)
    np.testing.assert_allclose(shown, accuracy[:len(shown)], atol=5e-5)
    assert "<i>" not in page and "i" not in parser.tags
    assert re.search(r"&lt;i&gt;class \d+&lt;/i&gt; &amp; co", page)


@pytest.mark.parametrize("num_classes", [4, 60])
def test_confusion_annotations_are_counts_and_capped(num_classes):
    rng = np.random.default_rng()
    cm = rng.integers(0, 50, (num_classes, num_classes))
    fig = plot_confusion(cm, [f"c{k}" for k in range(num_classes)])
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    if num_classes <= 20:
        assert texts == [str(v) for v in cm.ravel()]  # row-major: given label, then prediction
    else:
        assert texts == [] and len(ax.get_xticks()) <= 20


def test_find_confident_mistakes_against_a_loop():
    rng = np.random.default_rng()
    n, k = 50, 4
    probs = rng.dirichlet(np.ones(k), n)
    oof = pd.DataFrame({"image_id": [f"{i}.png" for i in range(n)], "label": rng.integers(0, k, n),
                        "fold": rng.integers(0, 2, n), "pred": probs.argmax(1)})
    for j in range(k):
        oof[f"prob_{j}"] = probs[:, j]
    found = find_confident_mistakes(oof, k, limit=7)
    slow = sorted(((probs[i].max(), i) for i in range(n) if probs[i].argmax() != oof["label"][i]),
                  reverse=True)
    assert found["image_id"].tolist() == [f"{i}.png" for _, i in slow[:7]]
    np.testing.assert_allclose(found["prob"], [p for p, _ in slow[:7]])


# The flags of a headless Chromium that stays off the network (report.CHROMIUM_FLAGS, spelled out
# here so that the test does not trust the code it checks); a fresh profile is added per call.
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPORT_SECTIONS = {"config": "Settings", "cv": "Cross-validation", "curves": "Learning curves",
                   "classes": "Confusion matrix and per-class accuracy",
                   "mistakes": "Most confidently wrong"}


def require_chromium() -> str:
    """The chromium binary; skip without one, except under CI (CI set) where a missing browser
    fails, so that CI can never silently stop opening the report in a browser (.ci/run installs it)."""
    binary = shutil.which("chromium")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but chromium is not installed; .ci/run installs it "
                        "(apt-get install -y chromium)")
        pytest.skip("chromium not installed (Debian: apt-get install chromium; CI installs it)")
    return binary


def dump_dom(binary: str, html_path: Path, profile: Path) -> str:
    """The DOM as Chromium built it from `html_path` (--dump-dom)."""
    command = [binary, *BROWSER_FLAGS, f"--user-data-dir={profile}", "--dump-dom",
               html_path.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "<html" in done.stdout, done.stderr[-2000:]
    return done.stdout


class SectionParser(HTMLParser):
    """Each <section id> with the text of its <h2>; the src of every <img>."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, str] = {}
        self.img_src: list[str] = []
        self._section: str | None = None
        self._heading: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self._section = attrs.get("id") or ""
        elif tag == "h2" and self._section is not None:
            self._heading = []
        elif tag == "img":
            self.img_src.append(attrs.get("src") or "")

    def handle_endtag(self, tag):
        if tag == "h2" and self._heading is not None:
            self.sections[self._section] = "".join(self._heading).strip()
            self._heading = None
        elif tag == "section":
            self._section = None

    def handle_data(self, data):
        if self._heading is not None:
            self._heading.append(data)


def test_report_renders_in_headless_chromium(runs, tmp_path):
    binary = require_chromium()
    full, _ = runs
    html_path = full / "report.html"
    dom = SectionParser()
    dom.feed(dump_dom(binary, html_path, tmp_path / "profile"))
    source = SectionParser()
    source.feed(html_path.read_text())
    # The browser built every section of the page, with its heading.
    assert dom.sections == source.sections
    for anchor, heading in REPORT_SECTIONS.items():
        assert dom.sections.get(anchor) == heading, (anchor, dom.sections)
    # Every embedded picture survived the browser's parse and decodes to a real image.
    assert len(dom.img_src) == len(source.img_src) >= 3
    sizes = []
    for uri in dom.img_src:
        with Image.open(io.BytesIO(decode_png(uri))) as image:
            sizes.append(image.size)
            assert min(image.size) >= 16, image.size  # thumbnails keep the 24 px training images
            assert np.asarray(image.convert("L")).std() > 1  # not a flat, empty picture
    assert sum(min(size) >= 200 for size in sizes) >= 2, sizes  # the curves and the confusion matrix
    shot = screenshot_report(html_path, tmp_path / "report.png", width=1280, height=2400)
    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    top = pixels[:800]
    assert top.std() > 10 and (top < 100).mean() > 0.002  # not blank: text and figures drawn
