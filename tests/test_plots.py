"""The report figure: a PNG of the expected shape, byte-identical on rewrite, clear errors."""

import math
import os

import pytest

from tagi_jax.evaluation import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

CATEGORIES = {
    "base": {"Title Generation": 20.0, "Coreference Resolution": 30.5, "Word Analogy": 10.0},
    "metatrain": {"Title Generation": 35.0, "Coreference Resolution": 41.0, "Word Analogy": 25.0},
    "TAGI": {"Title Generation": 38.2, "Coreference Resolution": 44.4, "Word Analogy": 27.9},
}
CURVES = {
    "base": [(0, 4.0), (100, 2.5), (200, 2.0)],
    "metatrain": [(0, 3.0), (50, 2.2), (100, 1.9)],
    "LoRA teachers (mean)": [(0, 2.5), (100, 1.2)],
    "TAGI": [(0, 5.0), (100, 1.5), (200, 1.1)],
}


def test_writes_png_of_expected_shape(tmp_path):
    from PIL import Image

    path = str(tmp_path / "nested" / "dir" / "results.png")
    assert plots.write_figure(path, CATEGORIES, CURVES, title="demo run") == path
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert os.path.getsize(path) > 10_000  # two panels of text and bars, not a blank canvas
    assert not os.path.exists(path + ".tmp")
    with Image.open(path) as image:
        width, height = image.size
    assert (width, height) == (1400, 600)
    assert width / height == pytest.approx(14 / 6)


def test_same_inputs_give_identical_bytes(tmp_path):
    first = plots.write_figure(str(tmp_path / "a.png"), CATEGORIES, CURVES, title="t")
    second = plots.write_figure(str(tmp_path / "b.png"), CATEGORIES, CURVES, title="t")
    with open(first, "rb") as a, open(second, "rb") as b:
        assert a.read() == b.read()


def test_overwrites_existing_file(tmp_path):
    path = tmp_path / "results.png"
    path.write_bytes(b"stale")
    plots.write_figure(str(path), CATEGORIES, CURVES)
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_curves_may_be_empty(tmp_path):
    path = plots.write_figure(str(tmp_path / "r.png"), CATEGORIES, {})
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE


def test_non_positive_losses_are_allowed(tmp_path):
    # Linear y instead of log; must not fail.
    curves = {"TAGI": [(0, 1.0), (10, 0.0), (20, -0.5)]}
    plots.write_figure(str(tmp_path / "r.png"), {"TAGI": {"a": 1.0}}, curves)


@pytest.mark.parametrize(
    ("categories", "curves", "match"),
    [
        ({}, CURVES, "categories is empty"),
        ({"base": {}}, {}, "row 'base' has no categories"),
        (
            {"base": {"a": 1.0, "b": 2.0}, "TAGI": {"a": 1.0, "c": 3.0}},
            {},
            r"row 'TAGI'.*row 'base'.*missing \['b'\], extra \['c'\]",
        ),
        ({"base": {"a": 1.0}, "TAGI": {"a": math.nan}}, {}, "row 'TAGI', category 'a'.*finite"),
        ({"base": {"a": math.inf}}, {}, "row 'base', category 'a'.*finite"),
        ({"base": {"a": "high"}}, {}, "row 'base', category 'a'.*not a number"),
        ({"base": {"a": 1.0}}, {"TAGI": []}, "curve 'TAGI' has no points"),
        ({"base": {"a": 1.0}}, {"TAGI": [(0, 1.0), (5, math.nan)]}, "'TAGI' at step 5"),
        ({"base": {"a": 1.0}}, {"TAGI": [(0, 1.0, 2.0)]}, r"'TAGI', point 0.*\(step, loss\)"),
    ],
)
def test_bad_inputs_raise(tmp_path, categories, curves, match):
    path = tmp_path / "r.png"
    with pytest.raises(ValueError, match=match):
        plots.write_figure(str(path), categories, curves)
    assert not path.exists()
    assert not (tmp_path / "r.png.tmp").exists()
