"""Your own images and captions as a TFDS dataset (array_record, no TensorFlow).

The folder holds images (any depth; symlinked folders are followed) and their
captions (listed by `jaxsd.data.folder_scan`), either
  * in `metadata.jsonl` files, one `{"file_name": "a/b.png", "text": "..."}` per
    line (the Hugging Face `imagefolder` convention: one at the top, or one in
    any folder with `file_name` relative to that folder; it may also name hidden
    files), or their other form `metadata.csv` (a `file_name,text` header, then a
    row per image), or
  * a caption file beside each image with the same stem (`b.png` + `b.txt`, or
    kohya's `b.caption`; the extension in any case), one line.
Images are the files with an extension PIL reads (`folder_scan.IMAGE_EXTENSIONS`, as the
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

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import types

from etils import epath
from PIL import Image, ImageOps, UnidentifiedImageError
import tensorflow_datasets as tfds

from jaxsd.conditioning import to_rgb
from jaxsd.data import folder_scan
from jaxsd.data.folder_scan import listing, scan_folder

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# Images up to this many pixels decode without PIL's DecompressionBombWarning, up to twice as many at all (PIL's
# own default is a quarter of it): large scans and panoramas are real data, downscaled to max_size anyway.
_MAX_PIXELS = 4 * 89_478_485
_FINGERPRINTED = ("max_size", "test_fraction", "seed")  # the settings that change the prepared data
_FORMAT = 2  # bump when the prepared data of an unchanged folder would differ (e.g. another conversion)
log = logging.getLogger(__name__)


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
        if len(unreadable) <= folder_scan.MAX_LISTED:
          log.warning("Skipping unreadable image %s", e)
        continue
      yield image, {"image": data, "caption": caption, "file_name": image}
    if unreadable and len(unreadable) == len(examples):
      raise ValueError(f"None of the {len(examples)} images of a split in {self._folder!r} "
                       f"can be read: {listing(unreadable)}")
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
