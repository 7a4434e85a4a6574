"""Tests for the procedural `shapes` dataset: determinism, captions, labels, pixels."""

from __future__ import annotations

import io
import random
import re

import numpy as np
from PIL import Image
import pytest

from jaxsd.data import shapes

NUM_TRAIN, NUM_TEST = 240, 40


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  name, builder = shapes.prepare_shapes(str(data_dir), num_train=NUM_TRAIN, num_test=NUM_TEST)
  return name, builder, data_dir


def _nearest_color(rgb) -> str:
  return min(shapes.COLORS, key=lambda c: np.sum((np.asarray(shapes.RGB[c], float) - rgb)**2))


def _decode(example, builder):
  names = {k: builder.info.features[k].names for k in ("shape", "color", "size", "position")}
  return {k: names[k][int(example[k])] for k in names}


def test_splits_and_name(prepared):
  name, builder, _ = prepared
  assert name == f"shapes/32x32_n{NUM_TRAIN}_{NUM_TEST}_s0"
  assert builder.info.splits["train"].num_examples == NUM_TRAIN
  assert builder.info.splits["test"].num_examples == NUM_TEST
  assert builder.info.file_format.value == "array_record"


def test_standard_configs():
  configs = {c.name: c for c in shapes.Shapes.BUILDER_CONFIGS}
  assert list(configs) == ["32x32", "64x64"]  # the first is the default
  for c in configs.values():
    assert c.num_train >= 50_000 and c.num_test >= 2_000
  assert configs["64x64"].image_size == 64


def test_deterministic_and_distinct_splits(prepared):
  _, builder, _ = prepared
  train = builder.as_data_source(split="train")
  test = builder.as_data_source(split="test")
  for i in (0, 7, NUM_TRAIN - 1):
    a, b = train[i], shapes.example(0, "train", i, 32)
    assert a["caption"].decode() == b["caption"]
    np.testing.assert_array_equal(a["image"], np.asarray(Image.open(io.BytesIO(b["image"]))))
  assert shapes.example(1, "train", 0, 32)["image"] != shapes.example(0, "train", 0, 32)["image"]
  assert not np.array_equal(train[0]["image"], test[0]["image"])


def test_captions_match_labels_and_pixels(prepared):
  _, builder, _ = prepared
  source = builder.as_data_source(split="train")
  counts = {k: set() for k in ("shape", "color", "size", "position")}
  full_captions = 0
  for i in range(NUM_TRAIN):
    ex = source[i]
    labels = _decode(ex, builder)
    for k, v in labels.items():
      counts[k].add(v)
    caption = ex["caption"].decode()
    # Every attribute the caption names is the labelled one; shape and colour always.
    words = set(re.findall(r"[a-z]+", caption))
    assert labels["shape"] in words and labels["color"] in words, caption
    for vocab, key in ((shapes.SHAPES, "shape"), (shapes.COLORS, "color"), (shapes.SIZES, "size")):
      assert words & set(vocab) <= {labels[key]}, caption
    named = [p for p in shapes.POSITIONS if shapes.POSITION_PHRASES[p] in caption]
    assert named in ([], [labels["position"]]), caption
    full_captions += caption.endswith(shapes.caption_for(**labels))
    # The shape's colour is at its centre.
    cx, cy = shapes.CENTERS[labels["position"]]
    rgb = ex["image"][round(cy * 32 - 0.5), round(cx * 32 - 0.5)].astype(float)
    assert _nearest_color(rgb) == labels["color"], (i, caption, rgb)
    assert np.abs(rgb - shapes.RGB[labels["color"]]).max() <= 20, (i, caption, rgb)
  assert counts["shape"] == set(shapes.SHAPES) and counts["color"] == set(shapes.COLORS)
  assert counts["size"] == set(shapes.SIZES) and counts["position"] == set(shapes.POSITIONS)
  assert 0.3 * NUM_TRAIN < full_captions < 0.9 * NUM_TRAIN  # phrasing varies


def test_sizes_differ_and_backgrounds_vary():
  areas = {"small": [], "large": []}
  corner_std = {"plain": [], "gradient": []}
  for i in range(200):
    image, attrs = shapes.render(random.Random(i), 64)
    color = np.asarray(shapes.RGB[attrs["color"]], float)
    mask = np.abs(image.astype(float) - color).max(-1) < 25
    areas[attrs["size"]].append(mask.mean())
    corners = image[[0, 0, -1, -1], [0, -1, 0, -1]].astype(float)
    corner_std[attrs["background"]].append(corners.std(0).max())
  assert max(areas["small"]) < min(areas["large"])
  assert max(corner_std["plain"]) == 0 and np.median(corner_std["gradient"]) > 5


def test_caption_for():
  assert shapes.caption_for("circle", "red", "small", "left") == "a small red circle on the left"
  assert shapes.caption_for("square", "blue") == "a blue square"
  assert shapes.caption_for("triangle", "orange") == "an orange triangle"
  assert shapes.caption_for("triangle", "orange", position="center") == ("an orange triangle in the center")
  with pytest.raises(ValueError, match="Unknown color 'pink'"):
    shapes.caption_for("circle", "pink")


def test_bad_config(tmp_path):
  with pytest.raises(ValueError, match="Unknown shapes config"):
    shapes.prepare_shapes(str(tmp_path), "16x16")
