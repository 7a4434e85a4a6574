"""Which images a folder holds and their captions: the listing and caption rules of `jaxsd.data.image_folder`.

`scan_folder(folder)` gives the (relative image path, caption) pairs a folder holds, from `metadata.jsonl` /
`metadata.csv` files (Hugging Face imagefolder's, at the top or in any subfolder) or caption files beside the
images (`b.png` + `b.txt` or kohya's `b.caption`). It decides what counts as an image (`IMAGE_EXTENSIONS`: what PIL
opens), matches names across Unicode normalisations, reads text as UTF-8 (a BOM, or UTF-16 with one, is fine),
skips undecodable names with a warning, and refuses what trainers would read differently (an image named twice,
two differing caption files of one image, empty or multi-line caption files, metadata.parquet). DreamBooth's
instance and class folders are listed with it too (`IMAGE_EXTENSIONS`, `CAPTION_EXTENSIONS`).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
import posixpath
import unicodedata

from PIL import Image


def _image_extensions() -> tuple[str, ...]:
  """The extensions of the formats PIL can open (not those it can only write, such as .pdf), lower-cased."""
  Image.init()
  return tuple(
      sorted({ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN or fmt == "MPO"}))


IMAGE_EXTENSIONS = _image_extensions()
_COMMON_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILE = "metadata.jsonl"
METADATA_FILES = (METADATA_FILE, "metadata.csv")  # Hugging Face imagefolder's: JSON lines, or CSV with a header
_PARQUET = "metadata.parquet"  # Hugging Face imagefolder's third form, not read here
CAPTION_EXTENSIONS = (".txt", ".caption")  # lower-cased; .caption is kohya's sd-scripts' default
MAX_LISTED = 10
log = logging.getLogger(__name__)


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_utf8(name: str) -> bool:
  try:
    name.encode("utf-8")
  except UnicodeEncodeError:  # os.fsdecode turned bytes that are not UTF-8 into lone surrogates
    return False
  return True


def _list_files(folder: str) -> tuple[list[str], list[str], list[str], list[str]]:
  """(images, caption files, metadata files, skipped images) under `folder`, relative, '/'-separated; warns about
  the skipped."""
  images, texts, metadata, dangling, not_utf8, repeated = [], [], [], [], [], []
  visited = {os.path.realpath(folder)}  # symlinked folders are followed once: no loops, no duplicates

  def rel(path):
    return os.path.relpath(path, folder).replace(os.sep, "/")

  for root, dirs, files in os.walk(folder, followlinks=True):
    dirs.sort()
    keep = set()
    for d in sorted(dirs, key=lambda d: os.path.islink(os.path.join(root, d))):  # real folders before links
      path = os.path.join(root, d)
      if d.startswith("."):
        continue
      if not _is_utf8(d):
        not_utf8.append(rel(path) + "/")
        continue
      real = os.path.realpath(path)
      if real in visited:
        repeated.append(rel(path))
        continue
      visited.add(real)
      keep.add(d)
    dirs[:] = [d for d in dirs if d in keep]
    for f in files:
      is_image, is_metadata = _is_image(f), f in METADATA_FILES + (_PARQUET,)
      if f.startswith(".") or not (is_image or is_metadata or f.lower().endswith(CAPTION_EXTENSIONS)):
        continue  # hidden files: .DS_Store, macOS's ._a.png AppleDouble files, ...
      path = os.path.join(root, f)
      if not _is_utf8(f):
        not_utf8.append(rel(path))
      elif not os.path.exists(path):
        dangling.append(rel(path))
      else:
        (images if is_image else metadata if is_metadata else texts).append(rel(path))
  if not_utf8:
    log.warning(
        "Skipping %d file(s) or folder(s) in %s whose names are not UTF-8 (e.g. from a zip made on Windows); "
        "rename them to UTF-8 names to use them: %s", len(not_utf8), folder,
        listing([repr(os.fsencode(p)) for p in not_utf8]))
  if dangling:
    log.warning("Skipping %d broken symlink(s) in %s (the file they point to does not exist): %s", len(dangling),
                folder, listing(dangling))
  if repeated:
    log.warning(
        "Skipping %d linked folder(s) in %s already scanned under another path (a symlink loop or a second "
        "link to a folder): %s", len(repeated), folder, listing(repeated))
  return sorted(images), sorted(texts), sorted(metadata), dangling


def _nfc(name: str) -> str:
  return unicodedata.normalize("NFC", name)


def _not_an_image(folder: str, name: str, images: list[str]) -> str | None:
  """Why `name` (from a metadata file, relative to `folder`) is no image file there, or None when it is one."""
  if os.path.isabs(name) or name == ".." or name.startswith("../"):
    return "outside the folder"
  path = os.path.join(folder, name)
  if not os.path.lexists(path):
    alike = [i for i in images if i.lower() == name.lower()]
    return "no such file" + (f"; did you mean {alike[0]!r}? (names are case-sensitive)" if alike else "")
  if not os.path.exists(path):
    return "a broken symlink"
  if not os.path.isfile(path):
    return "not a file"
  if not _is_image(name):
    return "not an image extension PIL reads"
  return None


def scan_folder(folder: str, caption_column: str = "text") -> list[tuple[str, str]]:
  """(relative image path, caption) pairs, sorted; errors name what is missing."""
  folder = os.path.expanduser(os.fspath(folder))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"Image folder {folder!r} does not exist.")
  images, texts, metadata_files, skipped = _list_files(folder)
  parquet = [m for m in metadata_files if posixpath.basename(m) == _PARQUET]
  if parquet:
    raise ValueError(f"{os.path.join(folder, parquet[0])} is a {_PARQUET}, which jaxsd does not read: write it as "
                     f"{METADATA_FILE} (pandas.read_parquet(it).to_json('{METADATA_FILE}', orient='records', "
                     "lines=True, force_ascii=False)), or as metadata.csv.")
  if metadata_files:
    captions = _metadata_captions(folder, metadata_files, images, caption_column)
    images = sorted(set(images) | set(captions))  # metadata may name hidden files
  if not images:
    common = ", ".join(_COMMON_EXTENSIONS)
    texts_found = f" It has {len(texts)} caption file(s) but no image beside them." if texts else ""
    raise ValueError(f"No images in {folder!r} (looked for the extensions PIL reads: {common} and "
                     f"{len(IMAGE_EXTENSIONS) - len(_COMMON_EXTENSIONS)} more).{texts_found}")

  if metadata_files:
    how = (f"an entry in the {' or '.join(METADATA_FILES)} of its folder or of a folder above it (found: "
           f"{listing(metadata_files)})")
    beside = _caption_files(texts)
    if any(_nfc(os.path.splitext(i)[0]) in beside for i in images if i not in captions):
      how += "; caption files beside the images are not read when the folder has a metadata file"
  else:
    captions = _txt_captions(folder, images, texts, skipped)
    how = f"a caption file with the same name beside it (b.png: b.txt or b.caption), or a {METADATA_FILE}"
  missing = [image for image in images if image not in captions]
  if missing:
    raise ValueError(f"{len(missing)} of {len(images)} images in {folder!r} have no caption; "
                     f"each needs {how}. Without caption: {listing(missing)}")
  return [(image, captions[image]) for image in images]


def _caption_files(texts: list[str]) -> dict[str, list[str]]:
  """The caption files by their path without extension, NFC-normalised (a name typed on Linux matches one
  written on macOS)."""
  by_stem = {}
  for t in texts:
    by_stem.setdefault(_nfc(os.path.splitext(t)[0]), []).append(t)
  return by_stem


def _txt_captions(folder: str, images: list[str], texts: list[str], skipped: list[str]) -> dict[str, str]:
  """Each image's caption from the caption file of the same name beside it (`.txt` as most trainers, `.caption`
  as kohya's sd-scripts; any case: a.TXT). Two that differ, or an empty one, are refused by name."""
  by_stem = _caption_files(texts)
  captions, differ, empty, lines = {}, [], [], []
  for image in images:
    files = by_stem.get(_nfc(os.path.splitext(image)[0]), [])
    found = {f: _read_text(os.path.join(folder, f)).strip() for f in files}
    if len(set(found.values())) > 1:
      differ.append(" and ".join(files))
    elif found:
      captions[image] = next(iter(found.values()))
      if not captions[image]:
        empty.append(" / ".join(files))
      elif len(captions[image].splitlines()) > 1:
        lines.append(" / ".join(files))
  if differ:
    raise ValueError(f"{len(differ)} image(s) in {folder!r} have two caption files that differ (trainers read "
                     f"one or the other: kohya's sd-scripts .caption by default, most others .txt); keep one of "
                     f"each: {listing(differ)}")
  if empty:
    raise ValueError(f"{len(empty)} caption file(s) in {folder!r} are empty: write each image's caption, or "
                     f"remove the image with it: {listing(empty)}")
  if lines:  # sd-scripts trains the first line (or with --enable_wildcard one line at random), others all of it
    raise ValueError(f"{len(lines)} caption file(s) in {folder!r} hold several lines, which trainers read "
                     f"differently (kohya's the first line, others the whole text): put each caption on one line: "
                     f"{listing(lines)}")
  stems = {_nfc(os.path.splitext(image)[0]) for image in images + skipped}
  orphans = [t for stem, files in by_stem.items() if stem not in stems for t in files]
  if orphans:
    log.warning(
        "%d caption file(s) in %s have no image with the same name beside them (is the image missing, or "
        "in a format PIL cannot read?); they are not used: %s", len(orphans), folder, listing(sorted(orphans)))
  return captions


def _metadata_captions(folder: str, metadata_files: list[str], images: list[str],
                       caption_column: str) -> dict[str, str]:
  """The captions of every metadata file under `folder` (Hugging Face imagefolder's: one in any folder, its
  `file_name`s relative to that folder), by image path relative to `folder`. A name matches a file whose name
  differs only by Unicode normalisation; an image named twice (by one file or two) and names that are no image
  are refused."""
  folders = {}
  for m in metadata_files:
    folders.setdefault(posixpath.dirname(m), []).append(m)
  for where, found in folders.items():
    if len(found) > 1:
      names = sorted(map(posixpath.basename, found), key=METADATA_FILES.index)
      raise ValueError(f"{os.path.join(folder, where) if where else folder!r} holds both {' and '.join(names)}: "
                       "keep one of them.")
  on_disk, by_nfc = set(images), {}
  for image in images:
    by_nfc.setdefault(_nfc(image), []).append(image)
  captions, named, unknown = {}, {}, []
  for m in metadata_files:
    path = os.path.join(folder, m)
    for name, (caption, lineno) in _read_metadata(path, caption_column).items():
      image = posixpath.normpath(posixpath.join(posixpath.dirname(m), name))
      if image not in on_disk and len(by_nfc.get(_nfc(image), [])) == 1:
        image = by_nfc[_nfc(image)][0]  # the same name in another Unicode normalisation (macOS writes NFD)
      if image in named:
        raise ValueError(f"{image!r} is named twice, by {named[image]} and {m}:{lineno} (in {folder!r}); give each "
                         "image one row.")
      named[image] = f"{m}:{lineno}"
      if image not in on_disk:
        why = _not_an_image(folder, image, images)
        if why:
          unknown.append(f"{name} ({m}:{lineno}: {why})")
          continue
      captions[image] = caption
  if unknown:
    raise ValueError(f"The metadata in {folder!r} names {len(unknown)} file(s) that are not images in the "
                     f"folder: {listing(unknown)}")
  return captions


def _read_text(path: str) -> str:
  """A text file's contents: UTF-8 (with or without a BOM), or UTF-16/32 with a BOM; else a ValueError."""
  with open(path, "rb") as f:
    data = f.read()
  codec = "utf-8-sig"
  for bom, bom_codec in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
    if data.startswith(bom):
      codec = bom_codec
      break
  try:
    return data.decode(codec)
  except UnicodeDecodeError as e:
    raise ValueError(f"{path} is not UTF-8 text (byte {data[e.start:e.start + 1]!r} at offset {e.start}, e.g. "
                     "Latin-1 or Windows-1252); save it as UTF-8.") from None


def _describe(value) -> str:
  """A JSON value that is not the string expected, for an error message."""
  if value is None:
    return "null"
  if isinstance(value, str):
    return "an empty string" if not value.strip() else f"a string with an invalid \\u escape: {json.dumps(value)[:100]}"
  kind = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(type(value))
  return f"{kind or type(value).__name__}: {json.dumps(value)[:100]}"


def _metadata_rows(path: str):
  """(line number, row, the line as written) of a metadata.jsonl or metadata.csv (a header row, then one row
  per image: Hugging Face imagefolder's two formats)."""
  text = _read_text(path)
  if path.endswith(".csv"):
    reader = csv.DictReader(io.StringIO(text))
    for row in reader:
      yield reader.line_num, row, ",".join(str(v) for v in row.values())
    return
  for lineno, line in enumerate(text.split("\n"), 1):
    if not line.strip():
      continue
    try:
      yield lineno, json.loads(line), line
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{lineno} is not valid JSON ({e}).") from None


def _read_metadata(path: str, caption_column: str) -> dict[str, tuple[str, int]]:
  """{file_name as written, normalised: (caption, line number)}."""
  captions = {}
  for lineno, row, line in _metadata_rows(path):
    if not isinstance(row, dict) or "file_name" not in row or caption_column not in row:
      others = [k for k in row if k != "file_name"] if isinstance(row, dict) else []
      hint = f", e.g. caption_column={others[0]!r}" if others else ""
      raise ValueError(f"{path}:{lineno} needs 'file_name' and {caption_column!r}; got {line.strip()[:200]} "
                       f"(when the captions are under another key, pass prepare_image_folder(..., "
                       f"caption_column=that key){hint}).")
    file_name, caption = row["file_name"], row[caption_column]
    if not isinstance(file_name, str) or not file_name.strip() or not _is_utf8(file_name):
      raise ValueError(f"{path}:{lineno}: 'file_name' must be a string, the image's path relative to the folder "
                       f"(e.g. \"a/b.png\"); got {_describe(file_name)}")
    if not isinstance(caption, str) or not _is_utf8(caption):
      one = " (one caption per row: repeat the row with a copy of the image for each caption)" if isinstance(
          caption, list) else ""
      raise ValueError(f"{path}:{lineno}: {caption_column!r} must be a string, the caption; got "
                       f"{_describe(caption)}{one}")
    if not caption and path.endswith(".csv"):  # Hugging Face reads an empty cell as missing (NaN): diffusers stops
      raise ValueError(f"{path}:{lineno}: the {caption_column!r} cell is empty; write the image's caption.")
    name = posixpath.normpath(file_name.replace("\\", "/"))  # Windows' separator too, as Hugging Face's
    if name in captions:
      raise ValueError(f"{path}: {name!r} is on lines {captions[name][1]} and {lineno}; give each image one row.")
    captions[name] = caption, lineno
  return captions


def listing(items: list[str]) -> str:
  shown = ", ".join(items[:MAX_LISTED])
  return shown + (f" ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")
