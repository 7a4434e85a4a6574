"""Your own images and captions as a TFDS dataset (array_record, no TensorFlow).

The folder holds images (any depth; symlinked folders are followed) and their
captions, either
  * in `metadata.jsonl` files, one `{"file_name": "a/b.png", "text": "..."}` per
    line (the Hugging Face `imagefolder` convention: one at the top, or one in
    any folder with `file_name` relative to that folder; it may also name hidden
    files), or their other form `metadata.csv` (a `file_name,text` header, then a
    row per image), or
  * a caption file beside each image with the same stem (`b.png` + `b.txt`, or
    kohya's `b.caption`; the extension in any case), one line.
Images are the files with an extension PIL reads (`IMAGE_EXTENSIONS`, as the
Hugging Face `imagefolder` accepts); text files are read as UTF-8 (a BOM, or
UTF-16 with a BOM, is fine). File names match across Unicode normalisations
(macOS writes `café` decomposed). What trainers would read differently is
refused by name: an image named twice, two differing caption files of one
image, empty or multi-line caption files.

  name, _ = prepare_image_folder("~/my_pets", data_dir)   # name == "my_pets"
  # training config: dataset="my_pets", data_dir=data_dir (the same data_dir)

Images PIL cannot decode, broken symlinks and files whose names are not UTF-8
are skipped with a warning that names them. 16-bit grey images are scaled to 8
bits (see `to_rgb`). The prepared dataset is read back from its files, so
training needs neither this module nor the original folder; `prepared_settings`
tells the settings (e.g. max_size) it was prepared with. Preparing again reuses
the data while the folder and the settings are unchanged, and refuses (unless
`overwrite=True`) when they have changed; an overwrite replaces the old data only
once the new data is complete.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import random
import re
import shutil
import tempfile
import types
import unicodedata

from etils import epath
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
import tensorflow_datasets as tfds


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
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_MAX_LISTED = 10
# Images up to this many pixels decode without PIL's DecompressionBombWarning, up to twice as many at all (PIL's
# own default is a quarter of it): large scans and panoramas are real data, downscaled to max_size anyway.
_MAX_PIXELS = 4 * 89_478_485
_FINGERPRINTED = ("max_size", "test_fraction", "seed")  # the settings that change the prepared data
_FORMAT = 2  # bump when the prepared data of an unchanged folder would differ (e.g. another conversion)
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
        _listing([repr(os.fsencode(p)) for p in not_utf8]))
  if dangling:
    log.warning("Skipping %d broken symlink(s) in %s (the file they point to does not exist): %s", len(dangling),
                folder, _listing(dangling))
  if repeated:
    log.warning(
        "Skipping %d linked folder(s) in %s already scanned under another path (a symlink loop or a second "
        "link to a folder): %s", len(repeated), folder, _listing(repeated))
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
           f"{_listing(metadata_files)})")
    beside = _caption_files(texts)
    if any(_nfc(os.path.splitext(i)[0]) in beside for i in images if i not in captions):
      how += "; caption files beside the images are not read when the folder has a metadata file"
  else:
    captions = _txt_captions(folder, images, texts, skipped)
    how = f"a caption file with the same name beside it (b.png: b.txt or b.caption), or a {METADATA_FILE}"
  missing = [image for image in images if image not in captions]
  if missing:
    raise ValueError(f"{len(missing)} of {len(images)} images in {folder!r} have no caption; "
                     f"each needs {how}. Without caption: {_listing(missing)}")
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
                     f"each: {_listing(differ)}")
  if empty:
    raise ValueError(f"{len(empty)} caption file(s) in {folder!r} are empty: write each image's caption, or "
                     f"remove the image with it: {_listing(empty)}")
  if lines:  # sd-scripts trains the first line (or with --enable_wildcard one line at random), others all of it
    raise ValueError(f"{len(lines)} caption file(s) in {folder!r} hold several lines, which trainers read "
                     f"differently (kohya's the first line, others the whole text): put each caption on one line: "
                     f"{_listing(lines)}")
  stems = {_nfc(os.path.splitext(image)[0]) for image in images + skipped}
  orphans = [t for stem, files in by_stem.items() if stem not in stems for t in files]
  if orphans:
    log.warning(
        "%d caption file(s) in %s have no image with the same name beside them (is the image missing, or "
        "in a format PIL cannot read?); they are not used: %s", len(orphans), folder, _listing(sorted(orphans)))
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
                     f"folder: {_listing(unknown)}")
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


def _listing(items: list[str]) -> str:
  shown = ", ".join(items[:_MAX_LISTED])
  return shown + (f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _fingerprint(folder: str, examples: list[tuple[str, str]], settings: dict) -> str:
  """Changes when an image (path, size, mtime), a caption or a setting in _FINGERPRINTED changes."""
  fingerprinted = {k: settings[k] for k in _FINGERPRINTED}
  h = hashlib.sha256(json.dumps({"format": _FORMAT, **fingerprinted}, sort_keys=True).encode())
  for image, caption in examples:
    path = os.path.join(folder, image)
    try:
      st = os.stat(path)
    except OSError as e:
      raise ValueError(f"Cannot read {path} ({e.strerror}); did it change while preparing? Try again.") from None
    h.update(f"{image}\0{st.st_size}\0{st.st_mtime_ns}\0{caption}\0".encode("utf-8", "surrogateescape"))
  return h.hexdigest()[:16]


def _what_changed(previous: dict | None, settings: dict) -> str:
  if not isinstance(previous, dict):
    return "it was prepared by an older jaxsd, which did not record its settings"
  changed = [
      f"{k} was {previous.get(k)!r}, now {settings[k]!r}" for k in _FINGERPRINTED if previous.get(k) != settings[k]
  ]
  return "; ".join(changed) if changed else "its images or captions changed"


def prepared_settings(name: str, data_dir: str | os.PathLike) -> dict | None:
  """The settings dataset `name` in `data_dir` was prepared with by prepare_image_folder.

  A dict with "max_size" (None: images kept at their size), "test_fraction", "seed", "caption_column" and
  "folder" (the image folder's absolute path); None when the dataset is not prepared there, or was prepared
  otherwise (e.g. by an older jaxsd). E.g. training can warn when its image size exceeds max_size.
  """
  root = os.path.join(os.fspath(data_dir), name)
  versions = []
  if os.path.isdir(root):
    for v in os.listdir(root):
      if re.fullmatch(r"\d+\.\d+\.\d+", v) and os.path.exists(os.path.join(root, v, "dataset_info.json")):
        versions.append(tuple(int(x) for x in v.split(".")))
  if not versions:
    return None
  path = os.path.join(root, ".".join(map(str, max(versions))), "metadata.json")
  try:
    with open(path, encoding="utf-8") as f:
      settings = json.load(f).get("settings")
  except (OSError, ValueError, AttributeError):
    return None
  return dict(settings) if isinstance(settings, dict) else None


class _Unreadable(Exception):
  """An image file that PIL cannot decode."""


@contextlib.contextmanager
def _pixel_limit():
  """Raises PIL's decompression-bomb limit to _MAX_PIXELS meanwhile (unless it is higher or off already)."""
  previous = Image.MAX_IMAGE_PIXELS
  if previous is not None:
    Image.MAX_IMAGE_PIXELS = None if _MAX_PIXELS is None else max(previous, _MAX_PIXELS)
  try:
    yield
  finally:
    Image.MAX_IMAGE_PIXELS = previous


def to_rgb(image: Image.Image) -> Image.Image:
  """The image as RGB. PIL's convert clips 16/32-bit grey at 255 (a 16-bit scan comes out nearly white), so:
  mode I;16* (16-bit) is divided by 257; mode I (32-bit integers) too when its maximum exceeds 255, as 16-bit
  data (values above 65535 clip), else kept; mode F (floats) is taken as 0..1 and multiplied by 255 when its
  maximum is at most 1, else clipped to 0..255 as before. Then rounded to 8-bit grey."""
  if image.mode == "RGB":
    return image
  if image.mode.startswith("I;16") or image.mode in ("I", "F"):
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max() > 255):
      values = values / 257
    elif image.mode == "F" and values.max() <= 1:
      values = values * 255
    image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))  # mode L
  return image.convert("RGB")


def _encode(path: str, max_size: int | None) -> bytes:
  """The file's bytes when already an RGB PNG/JPEG that fits, else re-encoded RGB."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise _Unreadable(f"{path}: {e.strerror or e}") from None
  try:
    with _pixel_limit():
      image = Image.open(io.BytesIO(data))
      fmt = image.format
      fits = max_size is None or min(image.size) <= max_size
      if not fits and fmt == "JPEG":  # decodes at 1/2, 1/4 or 1/8 of the size where that still exceeds max_size
        scale = max_size / min(image.size)
        image.draft(None, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
      image.load()  # decodes it all: catches truncated files now, not during training
    oriented = image.getexif().get(0x0112, 1) == 1  # EXIF orientation: none
    if fmt in ("PNG", "JPEG") and image.mode == "RGB" and fits and oriented:
      return data  # untouched
    image = to_rgb(image if oriented else ImageOps.exif_transpose(image))
  except Image.DecompressionBombError as e:
    raise _Unreadable(f"{path}: too large to decode ({e})") from None
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise _Unreadable(f"{path}: {e}") from None
  if min(image.size) > (max_size or math.inf):
    scale = max_size / min(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
  buffer = io.BytesIO()
  if fmt == "JPEG":
    image.save(buffer, format="JPEG", quality=95, subsampling=0)  # 4:4:4: 4:2:0 moved saturated edges by 100+ levels
  else:
    image.save(buffer, format="PNG")
  return buffer.getvalue()


class ImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Images and captions from a local folder; the dataset name is set per folder."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = epath.Path(__file__)  # TFDS would look it up via importlib_resources

  def __init__(self, *, folder: str, examples: list[tuple[str, str]], test_fraction: float, seed: int,
               max_size: int | None, fingerprint: str, settings: dict | None = None, **kwargs):
    self._folder = folder
    self._examples = examples
    self._test_fraction = test_fraction
    self._seed = seed
    self._max_size = max_size
    self._fingerprint = fingerprint
    self._settings = settings
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Images and captions from {self._folder}.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "caption": tfds.features.Text(),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "caption"),
        metadata=tfds.core.MetadataDict(fingerprint=self._fingerprint, settings=self._settings),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    examples = list(self._examples)
    random.Random(self._seed).shuffle(examples)
    num_test = round(len(examples) * self._test_fraction)
    if self._test_fraction > 0:
      num_test = min(max(num_test, 1), len(examples) - 1)
    splits = {"train": self._generate_examples(examples[num_test:])}
    if num_test:
      splits["test"] = self._generate_examples(examples[:num_test])
    return splits

  def _generate_examples(self, examples):
    unreadable = []
    for image, caption in examples:
      try:
        data = _encode(os.path.join(self._folder, image), self._max_size)
      except _Unreadable as e:
        unreadable.append(image)
        if len(unreadable) <= _MAX_LISTED:
          log.warning("Skipping unreadable image %s", e)
        continue
      yield image, {"image": data, "caption": caption, "file_name": image}
    if unreadable and len(unreadable) == len(examples):
      raise ValueError(f"None of the {len(examples)} images of a split in {self._folder!r} "
                       f"can be read: {_listing(unreadable)}")
    if unreadable:
      log.warning("Skipped %d unreadable image(s) of %d in %s.", len(unreadable), len(examples), self._folder)


def prepare_image_folder(folder: str | os.PathLike, data_dir: str | os.PathLike, *, name: str | None = None,
                         test_fraction: float = 0.0, caption_column: str = "text", max_size: int | None = None,
                         seed: int = 0, overwrite: bool = False) -> tuple[str, tfds.core.DatasetBuilder]:
  """Prepares an image + caption folder as a TFDS dataset in `data_dir`.

  Args:
    folder: the image folder (see the module docstring for the caption layouts).
    data_dir: the TFDS data directory the training config points to.
    name: the dataset name (lower_snake_case); defaults to the folder's name.
    test_fraction: the share of images held out as a "test" split (0: none).
    caption_column: the caption key in metadata.jsonl.
    max_size: when set, images whose shorter side is larger are downscaled to it
      at preparation (e.g. 512 for SD fine-tuning), so training decodes less.
    seed: fixes which images go to the test split.
    overwrite: re-prepare even when a dataset of that name was prepared from a
      different version of the folder or with other settings (test_fraction,
      seed, max_size); the old data stays until the new data is complete.

  Returns:
    (name, builder): the training config refers to the data as `dataset=name`
    with `data_dir=data_dir`.
  """
  folder = os.path.abspath(os.path.expanduser(os.fspath(folder)))
  data_dir = os.fspath(data_dir)
  if name is None:
    name = re.sub(r"[^a-z0-9]+", "_", os.path.basename(folder.rstrip("/")).lower()).strip("_")
    if not name or not name[0].isalpha():
      name = f"images_{name}".rstrip("_")
  if not _NAME_RE.match(name):
    raise ValueError(f"Dataset name {name!r} must be lower_snake_case (e.g. 'my_pets').")
  if name in tfds.list_builders(with_community_datasets=False):
    raise ValueError(f"{name!r} is the name of a registered TFDS dataset; pass another name=.")
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}.")
  if max_size is not None and max_size < 1:
    raise ValueError(f"max_size must be a positive number of pixels, got {max_size}.")

  examples = scan_folder(folder, caption_column)
  if test_fraction > 0 and len(examples) < 2:
    raise ValueError(f"A test split needs at least 2 images; {folder!r} has {len(examples)}.")
  settings = {
      "max_size": max_size,
      "test_fraction": float(test_fraction),
      "seed": int(seed),
      "caption_column": caption_column,
      "folder": folder
  }  # see prepared_settings
  fingerprint = _fingerprint(folder, examples, settings)
  cls = types.new_class(  # one builder class per dataset name, not registered
      f"ImageFolder_{name}", (ImageFolder,), {"skip_registration": True}, lambda ns: ns.update(name=name))

  def make_builder(where=data_dir):
    return cls(folder=folder, examples=examples, test_fraction=test_fraction, seed=seed, max_size=max_size,
               fingerprint=fingerprint, settings=settings, data_dir=where, file_format="array_record")

  download_config = tfds.download.DownloadConfig(try_download_gcs=False)
  builder = make_builder()
  if os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):  # prepared
    metadata = builder.info.metadata or {}
    if metadata.get("fingerprint") != fingerprint:
      if not overwrite:
        raise ValueError(f"Dataset {name!r} in {data_dir!r} was prepared from a different version of "
                         f"{folder!r} or with other settings ({_what_changed(metadata.get('settings'), settings)}); "
                         "pass overwrite=True to re-prepare it, or choose another name=.")
      # Prepared beside the old data (a fresh builder must not read the old info), which it replaces on success only.
      target = builder.data_dir
      staging = tempfile.mkdtemp(prefix=f".{name}-preparing-", dir=data_dir)
      try:
        fresh = make_builder(staging)
        fresh.download_and_prepare(download_config=download_config)
        old = os.path.join(staging, "replaced")
        os.rename(target, old)
        try:
          os.rename(fresh.data_dir, target)
        except OSError:
          os.rename(old, target)
          raise
      finally:
        shutil.rmtree(staging, ignore_errors=True)
      builder = make_builder()
  builder.download_and_prepare(download_config=download_config)
  return name, builder
