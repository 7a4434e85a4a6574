"""Tests for listing a folder's images and captions (`jaxsd.data.folder_scan.scan_folder`): what counts as an
image, metadata files and caption files, encodings, and what is refused by name."""

from __future__ import annotations

import csv
import json

import numpy as np
from PIL import features, Image
import pytest

from jaxsd.data import folder_scan
from tests.data.test_image_folder import _jsonl, _save


def test_all_extensions_pil_reads_and_orphan_captions(tmp_path, caplog):
  assert isinstance(folder_scan.IMAGE_EXTENSIONS, tuple)
  assert {".png", ".jpg", ".jfif", ".jpe", ".tga", ".ppm"} <= set(folder_scan.IMAGE_EXTENSIONS)
  assert ".pdf" not in folder_scan.IMAGE_EXTENSIONS  # PIL only writes it
  formats = {"jfif": "JPEG", "jpe": "JPEG", "tga": "TGA", "ppm": "PPM", "PNG": "PNG"}
  if features.check("avif"):
    formats["avif"] = "AVIF"
  root = tmp_path / "imgs"
  root.mkdir()
  for ext, fmt in formats.items():
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / f"img_{ext}.{ext}", format=fmt)
    (root / f"img_{ext}.txt").write_text(ext)
  (root / "photo.heic_unknown").write_bytes(b"x")
  (root / "photo.txt").write_text("its image is in a format PIL does not read")
  examples = folder_scan.scan_folder(root)
  assert examples == sorted((f"img_{ext}.{ext}", ext) for ext in formats)
  assert "1 caption file(s)" in caplog.text and "photo.txt" in caplog.text


def test_metadata_may_name_hidden_and_linked_files(tmp_path):
  root, target = tmp_path / "imgs", tmp_path / "target"
  for name in ("a.png", ".cache/b.png", ".c.png"):
    _save(root / name)
  _save(target / "d.png")
  (root / "linked").symlink_to(target)
  rows = [("a.png", "a"), (".cache/b.png", "b"), (".c.png", "c"), ("linked/d.png", "d")]
  (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": t}) + "\n" for f, t in rows))
  assert folder_scan.scan_folder(root) == sorted(rows)


def test_caption_encodings(tmp_path):
  root = tmp_path / "imgs"
  _save(root / "a.png")
  _save(root / "b.png")
  (root / "a.txt").write_bytes("\ufeffa dog\n".encode("utf-8"))  # BOM, as Windows Notepad writes
  (root / "b.txt").write_bytes("a caf\xe9".encode("utf-16"))  # with its BOM
  assert folder_scan.scan_folder(root) == [("a.png", "a dog"), ("b.png", "a caf\xe9")]
  for encoding in ("latin-1", "cp1252"):
    (root / "b.txt").write_bytes("\u201ca caf\xe9\u201d".encode(encoding, errors="replace"))
    with pytest.raises(ValueError, match=r"b\.txt is not UTF-8 text.*save it as UTF-8"):
      folder_scan.scan_folder(root)
  rows = json.dumps({
      "file_name": "a.png",
      "text": "a caf\xe9"
  }) + "\n" + json.dumps({
      "file_name": "b.png",
      "text": "b"
  })
  (root / "metadata.jsonl").write_bytes(("\ufeff" + rows).encode("utf-8"))
  assert folder_scan.scan_folder(root) == [("a.png", "a caf\xe9"), ("b.png", "b")]
  (root / "metadata.jsonl").write_bytes(rows.replace("\\u00e9", "\xe9").encode("latin-1"))
  with pytest.raises(ValueError, match=r"metadata\.jsonl is not UTF-8 text.*save it as UTF-8"):
    folder_scan.scan_folder(root)


@pytest.mark.parametrize("rows, error", [
    ([{
        "file_name": "a.png",
        "text": None
    }], r"metadata\.jsonl:1: 'text' must be a string.*got null"),
    ([{
        "file_name": "a.png",
        "text": ["a", "b"]
    }], r"metadata\.jsonl:1: 'text' must be a string.*got a list"),
    ([{
        "file_name": "a.png",
        "text": 7
    }], r"metadata\.jsonl:1: 'text' must be a string.*got a number: 7"),
    ([{
        "file_name": "a.png",
        "text": "a"
    }, {
        "file_name": 1,
        "text": "x"
    }], r"metadata\.jsonl:2: 'file_name' must be a string.*got a number: 1"),
    ([{
        "file_name": "a.png",
        "text": "a"
    }, {
        "file_name": "./a.png",
        "text": "b"
    }], r"metadata\.jsonl: 'a\.png' is on lines 1 and 2"),
    ([{
        "file_name": "a.png",
        "caption": "a"
    }], r"metadata\.jsonl:1 needs 'file_name' and 'text'.*caption_column="),
])
def test_metadata_values_of_the_wrong_type(tmp_path, rows, error):
  _save(tmp_path / "a.png")
  (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  with pytest.raises(ValueError, match=error):
    folder_scan.scan_folder(tmp_path)


def test_metadata_csv(tmp_path):
  """Hugging Face imagefolder's other metadata file: CSV with a header (quoted commas in captions); both files at
  once are refused."""
  root = tmp_path / "csv"
  rows = {"a.png": "a red circle, small", "sub/b.png": 'a "blue" square'}
  for i, name in enumerate(rows):
    _save(root / name, value=i)
  with open(root / "metadata.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["file_name", "text", "extra"])
    for name, text in rows.items():
      w.writerow([name, text, 1])
  assert dict(folder_scan.scan_folder(root)) == rows
  (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n")
  with pytest.raises(ValueError, match="holds both metadata.jsonl and metadata.csv: keep one"):
    folder_scan.scan_folder(root)


def test_metadata_files_in_sub_folders(tmp_path):
  """Hugging Face imagefolder reads a metadata file in any folder, its file_name relative to that folder (and
  "\\" as "/"); an image named by two of them is refused, as is one named by none."""
  root = tmp_path / "imgs"
  for name in ("top.png", "cats/a.png", "cats/x/b.png", "dogs/c.png"):
    _save(root / name)
  _jsonl(root / "metadata.jsonl", [("top.png", "top")])
  _jsonl(root / "cats" / "metadata.jsonl", [("a.png", "a cat"), ("x\\b.png", "another cat")])
  (root / "dogs" / "metadata.csv").write_text("file_name,text\nc.png,\"a dog, sitting\"\n")
  assert folder_scan.scan_folder(root) == [("cats/a.png", "a cat"), ("cats/x/b.png", "another cat"),
                                           ("dogs/c.png", "a dog, sitting"), ("top.png", "top")]
  _jsonl(root / "metadata.jsonl", [("top.png", "top"), ("cats/a.png", "a cat from the top")])
  with pytest.raises(ValueError, match=r"'cats/a\.png' is named twice, by cats/metadata\.jsonl:1 and "
                     r"metadata\.jsonl:2"):
    folder_scan.scan_folder(root)
  _jsonl(root / "metadata.jsonl", [])
  with pytest.raises(
      ValueError, match=r"1 of 4 images.*no caption; each needs an entry in the metadata.jsonl or "
      r"metadata.csv of its folder or of a folder above it.*Without caption: top\.png"):
    folder_scan.scan_folder(root)
  (root / "metadata.jsonl").unlink()
  (root / "top.txt").write_text("top")
  with pytest.raises(
      ValueError, match="caption files beside the images are not read when the folder has a "
      r"metadata file\. Without caption: top\.png"):
    folder_scan.scan_folder(root)


def test_caption_file_extensions(tmp_path):
  """A caption file in any case (a.TXT), or kohya's .caption; two that differ are refused, not one picked."""
  root = tmp_path / "imgs"
  for stem, ext in (("a", "TXT"), ("b", "Txt"), ("c", "caption"), ("d", "txt")):
    _save(root / f"{stem}.png")
    (root / f"{stem}.{ext}").write_text(f"caption {stem}\n")
  (root / "d.caption").write_text("caption d")  # the same caption: fine
  assert folder_scan.scan_folder(root) == [(f"{s}.png", f"caption {s}") for s in "abcd"]
  (root / "d.caption").write_text("another caption")
  with pytest.raises(ValueError, match=r"1 image\(s\).*two caption files that differ.*: d\.caption and d\.txt"):
    folder_scan.scan_folder(root)


def test_empty_and_multi_line_caption_files_are_refused(tmp_path):
  """kohya's sd-scripts refuses an empty caption file and trains only the first line of several; jaxsd would
  train the whole text: both are refused by name. A CRLF line end or a BOM is fine."""
  root = tmp_path / "imgs"
  _save(root / "a.png")
  _save(root / "b.png")
  (root / "a.txt").write_bytes(b"\xef\xbb\xbfa dog\r\n")
  (root / "b.txt").write_text(" \n")
  with pytest.raises(ValueError, match=r"1 caption file\(s\) .* are empty.*: b\.txt"):
    folder_scan.scan_folder(root)
  (root / "b.txt").write_text("a cat\r\non a mat\n")
  with pytest.raises(ValueError, match=r"1 caption file\(s\) .* hold several lines.*put each caption on one line: "
                     r"b\.txt"):
    folder_scan.scan_folder(root)
  (root / "b.txt").write_text("a cat on a mat\n")
  assert folder_scan.scan_folder(root) == [("a.png", "a dog"), ("b.png", "a cat on a mat")]


def test_a_metadata_name_in_another_case_is_named(tmp_path):
  _save(tmp_path / "Dog.PNG")
  _jsonl(tmp_path / "metadata.jsonl", [("dog.png", "a dog")])
  with pytest.raises(ValueError, match=r"dog\.png \(metadata\.jsonl:1: no such file; did you mean 'Dog\.PNG'"):
    folder_scan.scan_folder(tmp_path)


def test_metadata_parquet_is_refused_by_name(tmp_path):
  """Hugging Face imagefolder's third metadata form: not read (its captions would be missed), so refused."""
  _save(tmp_path / "a.png")
  (tmp_path / "a.txt").write_text("a caption that is not the one in the parquet file")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "metadata.parquet").write_bytes(b"PAR1")
  with pytest.raises(
      ValueError, match=r"sub/metadata\.parquet is a metadata\.parquet, which jaxsd does not read: "
      r"write it as metadata\.jsonl"):
    folder_scan.scan_folder(tmp_path)


def test_an_empty_csv_caption_is_refused(tmp_path):
  """pandas, and so Hugging Face's reader, takes an empty CSV cell as missing (diffusers then stops)."""
  _save(tmp_path / "a.png")
  _save(tmp_path / "b.png")
  (tmp_path / "metadata.csv").write_text("file_name,text\na.png,a dog\nb.png,\n")
  with pytest.raises(ValueError, match=r"metadata\.csv:3: the 'text' cell is empty"):
    folder_scan.scan_folder(tmp_path)
