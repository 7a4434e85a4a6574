"""`shapes`: a procedural text-to-image dataset of coloured shapes, built offline.

Every image shows one shape (circle, square, triangle) of one colour, size and
position on a plain or gradient background, with a caption that names them ("a
small red circle on the left") and the same attributes as `ClassLabel`s, so an
evaluation can score generated images against the prompt. Generation is
deterministic given the config's seed and needs neither downloads nor TensorFlow.

  name, builder = prepare_shapes(data_dir)          # 32x32, 50k train + 2k test
  # then in the training config: dataset='shapes/32x32', data_dir=data_dir
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import math
import random
import re

from etils import epath
import numpy as np
from PIL import Image, ImageDraw
import tensorflow_datasets as tfds

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = ("plain", "gradient")

# The attributes a generated image is judged on (ClassLabel features of the dataset), with their classes.
JUDGED = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS}
_NAME = re.compile(r"^shapes/(32x32|64x64)(?:_n(\d+)_(\d+)_s(\d+))?$")

# Saturated colours, far apart from each other and from the grey-ish backgrounds.
RGB = {
    "red": (220, 35, 35),
    "green": (35, 170, 55),
    "blue": (40, 70, 225),
    "yellow": (245, 215, 30),
    "purple": (145, 50, 195),
    "orange": (245, 135, 20),
}

# Shape centre as a fraction of the image side, (x, y).
CENTERS = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
# "Radius" of the shape as a fraction of the image side; a large shape at the
# edge still fits: 0.27 - jitter 0.03 - 0.22 * 1.05 > 0.
_RADII = {"small": 0.13, "large": 0.22}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Training captions vary a little; evaluation prompts use `caption_for`.
_PREFIXES = ("", "", "", "a picture of ", "an image of ", "a drawing of ")
_SUPERSAMPLE = 4  # masks are drawn 4x larger and box-filtered: anti-aliased edges
_SPLIT_IDS = {"train": 0, "test": 1}


def caption_for(shape: str, color: str, size: str | None = None, position: str | None = None) -> str:
  """The canonical caption, e.g. "a small red circle on the left"."""
  for value, vocab, what in ((shape, SHAPES, "shape"), (color, COLORS, "color"), (size, SIZES + (None,), "size"),
                             (position, POSITIONS + (None,), "position")):
    if value not in vocab:
      raise ValueError(f"Unknown {what} {value!r}; expected one of {vocab}.")
  words = " ".join(w for w in (size, color, shape) if w)
  article = "an" if words[0] in "aeiou" else "a"
  caption = f"{article} {words}"
  if position:
    caption += " " + POSITION_PHRASES[position]
  return caption


def canonical_prompts() -> tuple[list[str], dict[str, np.ndarray]]:
  """Every colour x shape x size x position as its canonical caption ("a large red circle in the
  center"), and the class index of each attribute per prompt (for the judge)."""
  prompts, labels = [], {a: [] for a in JUDGED}
  for color, shape, size, position in itertools.product(COLORS, SHAPES, SIZES, POSITIONS):
    prompts.append(caption_for(shape, color, size, position))
    for a, v in (("shape", shape), ("color", color), ("size", size), ("position", position)):
      labels[a].append(JUDGED[a].index(v))
  return prompts, {a: np.asarray(v, np.int32) for a, v in labels.items()}


def is_shapes(name: str) -> bool:
  """Whether a TFDS name refers to this dataset ("shapes/32x32", "shapes/32x32_n512_128_s0", ...)."""
  return bool(_NAME.match(name))


def prepare_named(data_dir: str, name: str) -> tuple[str, "Shapes"]:
  """`prepare_shapes` for a dataset name as `is_shapes` accepts it (the split sizes and seed in the name)."""
  m = _NAME.match(name)
  if not m:
    raise ValueError(
        f"{name!r} is not a shapes dataset name (shapes/32x32, shapes/64x64, shapes/32x32_n<train>_<test>_s<seed>).")
  size, n_train, n_test, seed = m.groups()
  kw = {} if n_train is None else dict(num_train=int(n_train), num_test=int(n_test), seed=int(seed))
  return prepare_shapes(data_dir, size, **kw)


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """Image side and split sizes; `seed` fixes every image and caption."""
  image_size: int = 32
  num_train: int = 50_000
  num_test: int = 2_000
  seed: int = 0


def render(rng: random.Random, image_size: int) -> tuple[np.ndarray, dict]:
  """Draws one random example: (uint8 image (S, S, 3), attribute names)."""
  image, attrs, _ = render_with_mask(rng, image_size)
  return image, attrs


def render_with_mask(rng: random.Random, image_size: int) -> tuple[np.ndarray, dict, np.ndarray]:
  """`render`, and the shape's coverage of each pixel as a uint8 mask (S, S, 1): 255 inside, 0 on the
  background, in between on the anti-aliased edge (the alpha the shape was composited with)."""
  attrs = {
      "shape": rng.choice(SHAPES),
      "color": rng.choice(COLORS),
      "size": rng.choice(SIZES),
      "position": rng.choice(POSITIONS),
      "background": rng.choice(BACKGROUNDS),
  }
  s = image_size
  background = _background(rng, s, attrs["background"])

  big = s * _SUPERSAMPLE
  jitter = 0.03
  cx = (CENTERS[attrs["position"]][0] + rng.uniform(-jitter, jitter)) * big
  cy = (CENTERS[attrs["position"]][1] + rng.uniform(-jitter, jitter)) * big
  r = _RADII[attrs["size"]] * rng.uniform(0.9, 1.05) * big
  mask = Image.new("L", (big, big), 0)
  draw = ImageDraw.Draw(mask)
  if attrs["shape"] == "circle":
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
  elif attrs["shape"] == "square":
    a = 0.886 * r  # same area as the circle
    draw.rectangle((cx - a, cy - a, cx + a, cy + a), fill=255)
  else:  # upward equilateral triangle (circumradius R), bounding box centred
    R = 1.2 * r
    draw.polygon([(cx, cy - 0.75 * R), (cx - R * math.sqrt(3) / 2, cy + 0.75 * R),
                  (cx + R * math.sqrt(3) / 2, cy + 0.75 * R)], fill=255)
  alpha = np.asarray(mask.reduce(_SUPERSAMPLE), np.float32)[..., None] / 255.0

  color = np.array(RGB[attrs["color"]], np.float32)
  color = np.clip(color + [rng.uniform(-12, 12) for _ in range(3)], 0, 255)
  image = background * (1.0 - alpha) + color * alpha
  return np.round(image).astype(np.uint8), attrs, np.round(alpha * 255).astype(np.uint8)


def _background(rng: random.Random, s: int, kind: str) -> np.ndarray:
  """A grey-ish (weakly tinted) plain or linear-gradient background, float (S, S, 3)."""

  def tone():
    grey = rng.uniform(40, 225)
    return np.array([grey + rng.uniform(-18, 18) for _ in range(3)], np.float32)

  c0 = tone()
  if kind == "plain":
    return np.broadcast_to(c0, (s, s, 3))
  c1 = tone()
  angle = rng.uniform(0, 2 * math.pi)
  coords = np.linspace(-0.5, 0.5, s, dtype=np.float32)
  t = math.cos(angle) * coords[None, :] + math.sin(angle) * coords[:, None]
  t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
  return c0 + t[..., None] * (c1 - c0)


def random_caption(rng: random.Random, attrs: dict) -> str:
  """A training caption: sometimes leaves out size or position, varies the opening."""
  size = attrs["size"] if rng.random() < 0.75 else None
  position = attrs["position"] if rng.random() < 0.75 else None
  caption = caption_for(attrs["shape"], attrs["color"], size, position)
  prefix = rng.choice(_PREFIXES)
  return prefix + caption


def example(seed: int, split: str, index: int, image_size: int) -> dict:
  """Example `index` of `split`: a pure function of its arguments."""
  rng = random.Random((seed << 40) | (_SPLIT_IDS[split] << 32) | index)
  image, attrs, mask = render_with_mask(rng, image_size)
  return {"image": _png(image), "mask": _png(mask[..., 0]), "caption": random_caption(rng, attrs), **attrs}


def _png(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Coloured shapes with captions and attribute labels."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "1.1.0": "A `mask` feature: the shape's coverage of each pixel (for a loss weighted on the shape); the "
               "images, captions and labels are those of 1.0.0.",
  }
  BUILDER_CONFIGS = [
      ShapesConfig(name="32x32", description="32x32 RGB.", image_size=32),
      ShapesConfig(name="64x64", description="64x64 RGB.", image_size=64),
  ]
  # TFDS would find this file through `importlib_resources` (not installed).
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.splitlines()[0],
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
            "mask": tfds.features.Image(shape=(s, s, 1), encoding_format="png"),
            "caption": tfds.features.Text(),
            "shape": tfds.features.ClassLabel(names=SHAPES),
            "color": tfds.features.ClassLabel(names=COLORS),
            "size": tfds.features.ClassLabel(names=SIZES),
            "position": tfds.features.ClassLabel(names=POSITIONS),
            "background": tfds.features.ClassLabel(names=BACKGROUNDS),
        }),
        supervised_keys=("image", "caption"),
        # Examples are already i.i.d.; not shuffling on write keeps example i
        # of a split at index i (see `example`). Readers shuffle anyway.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    c = self.builder_config
    splits = {"train": self._generate_examples("train", c.num_train)}
    if c.num_test:
      splits["test"] = self._generate_examples("test", c.num_test)
    return splits

  def _generate_examples(self, split: str, num: int):
    c = self.builder_config
    for i in range(num):
      yield i, example(c.seed, split, i, c.image_size)


def prepare_shapes(data_dir: str, config: str = "32x32", *, num_train: int | None = None, num_test: int | None = None,
                   seed: int = 0) -> tuple[str, Shapes]:
  """Generates `shapes` into `data_dir` (a no-op when already there).

  Args:
    data_dir: the TFDS data directory.
    config: "32x32" or "64x64".
    num_train, num_test: smaller (or larger) splits, e.g. for tests. With these or
      a non-zero seed the dataset gets its own config name, e.g.
      "32x32_n300_300_s0", so it never mixes with the standard one.
    seed: changes every image and caption.

  Returns:
    (name, builder): `name` (e.g. "shapes/32x32") is what a training config's
    dataset name refers to, together with `data_dir`.
  """
  standard = {c.name: c for c in Shapes.BUILDER_CONFIGS}
  if config not in standard:
    raise ValueError(f"Unknown shapes config {config!r}; choose from {sorted(standard)}.")
  base = standard[config]
  if num_train is None and num_test is None and seed == 0:
    builder_config = base
  else:
    num_train = base.num_train if num_train is None else num_train
    num_test = base.num_test if num_test is None else num_test
    if num_train < 1 or num_test < 0:
      raise ValueError(f"Need num_train >= 1 and num_test >= 0, got {num_train}, {num_test}.")
    builder_config = ShapesConfig(name=f"{config}_n{num_train}_{num_test}_s{seed}", description=base.description,
                                  image_size=base.image_size, num_train=num_train, num_test=num_test, seed=seed)
  builder = Shapes(config=builder_config, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return f"shapes/{builder_config.name}", builder
