"""Tests for preparing a folder of images + captions as a TFDS dataset (the listing and caption rules:
test_folder_scan.py)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from jaxsd.data import folder_scan, image_folder


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


def _captioned(root, names):
  for i, name in enumerate(names):
    _save(root / name, value=i)
    (root / name).with_suffix(".txt").write_text(f"caption {name}")


def test_changed_settings_are_refused_and_named(tmp_path):
  root, data_dir = tmp_path / "imgs", tmp_path / "tfds"
  _captioned(root, ["a.png", "b.png", "c.png", "d.png"])
  image_folder.prepare_image_folder(root, data_dir)
  for kwargs, changed in (({
      "test_fraction": 0.5
  }, "test_fraction was 0.0, now 0.5"), ({
      "seed": 1
  }, "seed was 0, now 1"), ({
      "max_size": 8
  }, "max_size was None, now 8")):
    with pytest.raises(ValueError, match=f"different version.*{changed}.*overwrite=True"):
      image_folder.prepare_image_folder(root, data_dir, **kwargs)
  _, builder = image_folder.prepare_image_folder(root, data_dir, test_fraction=0.5, overwrite=True)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 2, "test": 2}
  image_folder.prepare_image_folder(root, data_dir, test_fraction=0.5)  # unchanged now: reused
  assert not [p.name for p in data_dir.iterdir() if "preparing" in p.name]  # nothing left of the staging


def test_prepared_settings(tmp_path):
  root, data_dir = tmp_path / "imgs", tmp_path / "tfds"
  _captioned(root, ["a.png", "b.png"])
  assert image_folder.prepared_settings("imgs", data_dir) is None
  image_folder.prepare_image_folder(root, data_dir, max_size=20, test_fraction=0.5, seed=3)
  assert image_folder.prepared_settings("imgs", data_dir) == {
      "max_size": 20,
      "test_fraction": 0.5,
      "seed": 3,
      "caption_column": "text",
      "folder": str(root)
  }


def test_symlinked_folders_loops_and_broken_links(tmp_path, caplog):
  elsewhere, root = tmp_path / "elsewhere", tmp_path / "imgs"
  _captioned(elsewhere, ["s1.png", "s2.png"])
  _captioned(root, ["a.png"])
  (root / "linked_dir").symlink_to(elsewhere)
  (root / "loop").symlink_to(root)
  (root / "dangling.png").symlink_to(tmp_path / "nonexistent.png")
  (root / "dangling.txt").write_text("its image is a broken link")
  _, builder = image_folder.prepare_image_folder(root, tmp_path / "tfds")
  assert builder.info.splits["train"].num_examples == 3
  assert sorted(_read_all("imgs", tmp_path / "tfds", "train")) == ["a.png", "linked_dir/s1.png", "linked_dir/s2.png"]
  assert "broken symlink(s)" in caplog.text and "dangling.png" in caplog.text
  assert "already scanned" in caplog.text and "loop" in caplog.text
  assert "dangling.txt" not in caplog.text  # not an orphan: its image was skipped with a warning


def test_file_names_that_are_not_utf8_are_skipped(tmp_path, caplog):
  root = tmp_path / "imgs"
  _captioned(root, ["ok.png"])
  latin1 = os.fsencode(root) + b"/caf\xe9"  # as unpacked from a zip made on Windows
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(latin1 + b".png")
  with open(latin1 + b".txt", "w") as f:
    f.write("a latin-1 name")
  name, _ = image_folder.prepare_image_folder(root, tmp_path / "tfds")
  assert list(_read_all(name, tmp_path / "tfds", "train")) == ["ok.png"]
  assert r"b'caf\xe9.png'" in caplog.text and "rename them to UTF-8" in caplog.text


def test_large_images_are_decoded_or_skipped_by_name(tmp_path, monkeypatch, caplog):
  root, data_dir = tmp_path / "imgs", tmp_path / "tfds"
  _captioned(root, ["wide.png", "photo.jpg", "tiny.png"])
  _save(root / "photo.jpg", size=(400, 200))  # decoded reduced (JPEG draft), then resized
  _save(root / "tiny.png", size=(8, 8))
  with monkeypatch.context() as m:
    m.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # wide.png stands in for a 200 MP panorama: PIL refuses > 200 pixels
    name, _ = image_folder.prepare_image_folder(root, data_dir, max_size=12)
    assert Image.MAX_IMAGE_PIXELS == 100  # restored
    m.setattr(image_folder, "_MAX_PIXELS", 100)  # too large even so: skipped, named
    small, _ = image_folder.prepare_image_folder(root, data_dir, name="small", max_size=12)
  shapes = {k: v["image"].shape for k, v in _read_all(name, data_dir, "train").items()}
  assert shapes == {"wide.png": (12, 18, 3), "photo.jpg": (12, 24, 3), "tiny.png": (8, 8, 3)}
  assert list(_read_all(small, data_dir, "train")) == ["tiny.png"]
  assert "wide.png: too large to decode" in caplog.text and "photo.jpg: too large" in caplog.text


def test_failed_overwrite_keeps_the_old_data(tmp_path):
  root, data_dir = tmp_path / "imgs", tmp_path / "tfds"
  _captioned(root, ["a.png"])
  image_folder.prepare_image_folder(root, data_dir)
  (root / "a.png").write_bytes(b"no longer an image")
  with pytest.raises(ValueError, match="None of the 1 images"):
    image_folder.prepare_image_folder(root, data_dir, overwrite=True)
  assert _read_all("imgs", data_dir, "train")["a.png"]["caption"] == b"caption a.png"
  assert not [p.name for p in data_dir.iterdir() if "preparing" in p.name]


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
  ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
  root = tmp_path / "imgs"
  root.mkdir()
  Image.fromarray(ramp).save(root / "ramp.png")
  assert Image.open(root / "ramp.png").mode.startswith("I")
  (root / "ramp.txt").write_text("a ramp")
  name, _ = image_folder.prepare_image_folder(root, tmp_path / "tfds")
  image = _read_all(name, tmp_path / "tfds", "train")["ramp.png"]["image"]
  np.testing.assert_array_equal(image[..., 0], np.round(ramp / 257).astype(np.uint8))

  # 32-bit integers above 255: taken as 16-bit; at most 255: kept. Floats at most 1: taken as 0..1.
  def as_rgb(array, mode):
    image = Image.fromarray(array)
    assert image.mode == mode
    return np.asarray(image_folder.to_rgb(image))[..., 0]

  np.testing.assert_array_equal(as_rgb(np.array([[0, 257, 65535]], np.int32), "I"), [[0, 1, 255]])
  np.testing.assert_array_equal(as_rgb(np.array([[0, 7, 255]], np.int32), "I"), [[0, 7, 255]])
  np.testing.assert_array_equal(as_rgb(np.array([[0.0, 0.5, 1.0]], np.float32), "F"), [[0, 128, 255]])
  np.testing.assert_array_equal(as_rgb(np.array([[-3.0, 7.0, 300.0]], np.float32), "F"), [[0, 7, 255]])


def _jsonl(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps({"file_name": f, "text": t}) + "\n" for f, t in rows))


@pytest.mark.parametrize("written, on_disk", [("NFC", "NFD"), ("NFD", "NFC")])
def test_names_match_across_unicode_normalisations(tmp_path, written, on_disk):
  """macOS writes file names decomposed (NFD), most other tools composed (NFC): 'café.png' is one file."""
  import unicodedata  # pylint: disable=g-import-not-at-top
  disk, text = (unicodedata.normalize(form, "caf\xe9") for form in (on_disk, written))
  root = tmp_path / "meta"
  _save(root / f"{disk}.png")
  _jsonl(root / "metadata.jsonl", [(f"{text}.png", "a coffee")])
  name, _ = image_folder.prepare_image_folder(root, tmp_path / "tfds")
  assert [ex["caption"].decode() for ex in _read_all(name, tmp_path / "tfds", "train").values()] == ["a coffee"]
  root = tmp_path / "txt"
  _save(root / f"{disk}.png")
  (root / f"{text}.txt").write_text("a coffee")
  assert folder_scan.scan_folder(root) == [(f"{disk}.png", "a coffee")]


def test_reencoded_jpegs_keep_their_colours(tmp_path):
  """A JPEG that must be re-encoded (here: EXIF-rotated) is written at full chroma resolution: what trains is the
  rotated picture within a few levels (4:2:0 subsampling moved a colourful image's pixels by 100+ levels)."""
  rng = np.random.default_rng(0)
  pixels = np.clip(np.cumsum(rng.normal(0, 6, (64, 48, 3)), 1) + 128, 0, 255).astype(np.uint8)
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise to display
  path = tmp_path / "a.jpg"
  Image.fromarray(pixels).save(path, quality=100, subsampling=0, exif=exif)
  shown = np.asarray(Image.open(path).transpose(Image.Transpose.ROTATE_270)).astype(int)
  out = np.asarray(Image.open(io.BytesIO(image_folder._encode(str(path), None)))).astype(int)
  assert out.shape == shown.shape == (48, 64, 3)
  assert np.abs(out - shown).mean() < 3 and np.abs(out - shown).max() < 40
