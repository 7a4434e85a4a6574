"""Tests for preparing a folder of images + captions as a TFDS dataset."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from jaxsd.data import image_folder


def _save(path, size=(24, 16), mode="RGB", value=0):
  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(value)
  channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
  pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
  Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)
  return pixels


def _jsonl_folder(root):
  rows = []
  for i in range(6):
    name = f"{'sub/' if i % 2 else ''}img{i}.{'jpg' if i == 5 else 'png'}"
    _save(root / name, value=i)
    rows.append({"file_name": name, "text": f"caption number {i}", "extra": i})
  (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return {r["file_name"]: r["text"] for r in rows}


def _read_all(name, data_dir, split):
  source = tfds.data_source(name, data_dir=str(data_dir), split=split)
  return {ex["file_name"].decode(): ex for ex in (source[i] for i in range(len(source)))}


def test_metadata_jsonl(tmp_path):
  captions = _jsonl_folder(tmp_path / "My Pets")
  name, builder = image_folder.prepare_image_folder(tmp_path / "My Pets", tmp_path / "tfds", test_fraction=0.34)
  assert name == "my_pets"
  assert builder.info.file_format.value == "array_record"
  train = _read_all(name, tmp_path / "tfds", "train")
  test = _read_all(name, tmp_path / "tfds", "test")
  assert (len(train), len(test)) == (4, 2)
  assert set(train) | set(test) == set(captions)
  for file_name, ex in {**train, **test}.items():
    assert ex["caption"].decode() == captions[file_name]
    assert ex["image"].shape == (16, 24, 3)
    if file_name.endswith(".png"):  # stored losslessly, untouched
      want = np.asarray(Image.open(tmp_path / "My Pets" / file_name))
      np.testing.assert_array_equal(ex["image"], want)


def test_txt_captions_and_conversions(tmp_path):
  root = tmp_path / "imgs"
  gray = _save(root / "gray.png", mode="L", value=1)
  _save(root / "rgba.png", mode="RGBA", value=2)
  _save(root / "big.bmp", size=(80, 40), value=3)
  for stem in ("gray", "rgba", "big"):
    (root / f"{stem}.txt").write_text(f"  a {stem} picture\n")
  name, _ = image_folder.prepare_image_folder(root, tmp_path / "tfds", name="mine", max_size=20)
  examples = _read_all(name, tmp_path / "tfds", "train")
  assert {
      k: v["caption"].decode() for k, v in examples.items()
  } == {
      "gray.png": "a gray picture",
      "rgba.png": "a rgba picture",
      "big.bmp": "a big picture"
  }
  assert examples["gray.png"]["image"].shape == (16, 24, 3)  # grey -> RGB
  np.testing.assert_array_equal(examples["gray.png"]["image"][..., 1], gray[..., 0])
  assert examples["rgba.png"]["image"].shape == (16, 24, 3)
  assert examples["big.bmp"]["image"].shape == (20, 40, 3)  # shorter side -> max_size


def test_reuse_changed_folder_and_overwrite(tmp_path):
  root = tmp_path / "imgs"
  _save(root / "a.png")
  (root / "a.txt").write_text("first")
  image_folder.prepare_image_folder(root, tmp_path / "tfds")
  image_folder.prepare_image_folder(root, tmp_path / "tfds")  # unchanged: reused
  (root / "a.txt").write_text("second")
  with pytest.raises(ValueError, match="different version.*overwrite=True"):
    image_folder.prepare_image_folder(root, tmp_path / "tfds")
  image_folder.prepare_image_folder(root, tmp_path / "tfds", overwrite=True)
  assert _read_all("imgs", tmp_path / "tfds", "train")["a.png"]["caption"] == b"second"


def test_errors(tmp_path):
  data_dir = tmp_path / "tfds"
  with pytest.raises(FileNotFoundError, match="does not exist"):
    image_folder.prepare_image_folder(tmp_path / "nope", data_dir)
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "notes.txt").write_text("hi")
  with pytest.raises(ValueError, match="No images in"):
    image_folder.prepare_image_folder(tmp_path / "empty", data_dir)

  root = tmp_path / "partial"
  for i in range(3):
    _save(root / f"p{i}.png")
  (root / "p1.txt").write_text("only this one")
  with pytest.raises(ValueError, match=r"2 of 3 images.*no caption.*p0\.png, p2\.png"):
    image_folder.prepare_image_folder(root, data_dir)

  (root / "metadata.jsonl").write_text(
      json.dumps({
          "file_name": "p0.png",
          "text": "x"
      }) + "\n" + json.dumps({
          "file_name": "gone.png",
          "text": "y"
      }) + "\n")
  with pytest.raises(ValueError, match="not images in the folder: gone.png"):
    image_folder.prepare_image_folder(root, data_dir)
  (root / "metadata.jsonl").write_text(json.dumps({"file_name": "p0.png", "caption": "x"}))
  with pytest.raises(ValueError, match="needs 'file_name' and 'text'"):
    image_folder.prepare_image_folder(root, data_dir)

  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "fake.png").write_bytes(b"this is not a png")
  (bad / "fake.txt").write_text("a caption")
  with pytest.raises(ValueError, match="None of the 1 images.*can be read: fake.png"):
    image_folder.prepare_image_folder(bad, data_dir)

  with pytest.raises(ValueError, match="lower_snake_case"):
    image_folder.prepare_image_folder(root, data_dir, name="Bad Name")
  with pytest.raises(ValueError, match="registered TFDS dataset"):
    image_folder.prepare_image_folder(root, data_dir, name="shapes")


def test_unreadable_images_are_skipped_with_a_warning(tmp_path, caplog):
  root = tmp_path / "imgs"
  _save(root / "ok.png")
  buffer = io.BytesIO()
  Image.fromarray(np.zeros((16, 16, 3), np.uint8) + 100).save(buffer, format="PNG")
  (root / "cut.png").write_bytes(buffer.getvalue()[:60])  # valid header, data cut off
  (root / "fake.jpg").write_bytes(b"not a jpeg")
  for stem in ("ok", "cut", "fake"):
    (root / f"{stem}.txt").write_text(stem)
  name, builder = image_folder.prepare_image_folder(root, tmp_path / "tfds")
  assert builder.info.splits["train"].num_examples == 1
  assert list(_read_all(name, tmp_path / "tfds", "train")) == ["ok.png"]
  logged = caplog.text
  assert "cut.png" in logged and "fake.jpg" in logged and "Skipped 2 unreadable" in logged
