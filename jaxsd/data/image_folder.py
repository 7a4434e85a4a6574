"""Your own images and captions as a TFDS dataset (array_record, no TensorFlow).

The folder holds images (any depth) and their captions, either
  * `metadata.jsonl` at the top, one `{"file_name": "a/b.png", "text": "..."}` per
    line (the Hugging Face `imagefolder` convention), or
  * a `.txt` file beside each image with the same stem (`b.png` + `b.txt`).

  name, _ = prepare_image_folder("~/my_pets", data_dir)   # name == "my_pets"
  # training config: dataset="my_pets", data_dir=data_dir (the same data_dir)

Images PIL cannot decode are skipped with a warning that names them. The
prepared dataset is read back from its files, so training needs neither this
module nor the original folder. Preparing again reuses the data while the folder
is unchanged, and refuses (unless `overwrite=True`) when it has changed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import types

from etils import epath
from PIL import Image, ImageOps, UnidentifiedImageError
import tensorflow_datasets as tfds

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILE = "metadata.jsonl"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_MAX_LISTED = 10
log = logging.getLogger(__name__)


def scan_folder(folder: str, caption_column: str = "text") -> list[tuple[str, str]]:
  """(relative image path, caption) pairs, sorted; errors name what is missing."""
  folder = os.path.expanduser(os.fspath(folder))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"Image folder {folder!r} does not exist.")
  images = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for f in files:
      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
        images.append(os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/"))
  images.sort()
  if not images:
    raise ValueError(f"No images in {folder!r} (looked for {', '.join(IMAGE_EXTENSIONS)}).")

  metadata_path = os.path.join(folder, METADATA_FILE)
  if os.path.exists(metadata_path):
    captions = _read_metadata(metadata_path, caption_column)
    unknown = sorted(set(captions) - set(images))
    if unknown:
      raise ValueError(f"{metadata_path} names {len(unknown)} file(s) that are not images "
                       f"in the folder: {_listing(unknown)}")
    how = f"an entry in {METADATA_FILE}"
  else:
    captions = {}
    for image in images:
      txt = os.path.join(folder, os.path.splitext(image)[0] + ".txt")
      if os.path.exists(txt):
        with open(txt, encoding="utf-8") as f:
          captions[image] = f.read().strip()
    how = f"a .txt file with the same name beside it (or a {METADATA_FILE})"
  missing = [image for image in images if image not in captions]
  if missing:
    raise ValueError(f"{len(missing)} of {len(images)} images in {folder!r} have no caption; "
                     f"each needs {how}. Without caption: {_listing(missing)}")
  return [(image, captions[image]) for image in images]


def _read_metadata(path: str, caption_column: str) -> dict[str, str]:
  captions = {}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno} is not valid JSON ({e}).") from None
      if not isinstance(row, dict) or "file_name" not in row or caption_column not in row:
        raise ValueError(f"{path}:{lineno} needs 'file_name' and {caption_column!r}; "
                         f"got {line.strip()[:200]}")
      captions[os.path.normpath(row["file_name"]).replace(os.sep, "/")] = str(row[caption_column])
  return captions


def _listing(items: list[str]) -> str:
  shown = ", ".join(items[:_MAX_LISTED])
  return shown + (f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _fingerprint(folder: str, examples: list[tuple[str, str]], max_size: int | None) -> str:
  """Changes when an image (path, size, mtime) or caption changes."""
  h = hashlib.sha256(f"max_size={max_size}".encode())
  for image, caption in examples:
    st = os.stat(os.path.join(folder, image))
    h.update(f"{image}\0{st.st_size}\0{st.st_mtime_ns}\0{caption}\0".encode())
  return h.hexdigest()[:16]


class _Unreadable(Exception):
  """An image file that PIL cannot decode."""


def _encode(path: str, max_size: int | None) -> bytes:
  """The file's bytes when already an RGB PNG/JPEG that fits, else re-encoded RGB."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes it all: catches truncated files now, not during training
    fmt = image.format
    fits = max_size is None or min(image.size) <= max_size
    oriented = image.getexif().get(0x0112, 1) == 1  # EXIF orientation: none
    if fmt in ("PNG", "JPEG") and image.mode == "RGB" and fits and oriented:
      return data  # untouched
    image = ImageOps.exif_transpose(image).convert("RGB")
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise _Unreadable(f"{path}: {e}") from None
  if not fits:
    scale = max_size / min(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
  buffer = io.BytesIO()
  if fmt == "JPEG":
    image.save(buffer, format="JPEG", quality=95)
  else:
    image.save(buffer, format="PNG")
  return buffer.getvalue()


class ImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Images and captions from a local folder; the dataset name is set per folder."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = epath.Path(__file__)  # TFDS would look it up via importlib_resources

  def __init__(self, *, folder: str, examples: list[tuple[str, str]], test_fraction: float, seed: int,
               max_size: int | None, fingerprint: str, **kwargs):
    self._folder = folder
    self._examples = examples
    self._test_fraction = test_fraction
    self._seed = seed
    self._max_size = max_size
    self._fingerprint = fingerprint
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
        metadata=tfds.core.MetadataDict(fingerprint=self._fingerprint),
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
      different version of the folder.

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
  fingerprint = _fingerprint(folder, examples, max_size)
  cls = types.new_class(  # one builder class per dataset name, not registered
      f"ImageFolder_{name}", (ImageFolder,), {"skip_registration": True}, lambda ns: ns.update(name=name))

  def make_builder():
    return cls(folder=folder, examples=examples, test_fraction=test_fraction, seed=seed, max_size=max_size,
               fingerprint=fingerprint, data_dir=data_dir, file_format="array_record")

  builder = make_builder()
  if os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):  # prepared
    previous = (builder.info.metadata or {}).get("fingerprint")
    if previous != fingerprint:
      if not overwrite:
        raise ValueError(f"Dataset {name!r} in {data_dir!r} was prepared from a different version of "
                         f"{folder!r} (or with another max_size); pass overwrite=True to re-prepare "
                         "it, or choose another name=.")
      shutil.rmtree(builder.data_dir)  # a fresh builder must not read the old info
      builder = make_builder()
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return name, builder
