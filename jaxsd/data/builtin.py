"""Datasets jaxsd can make on demand, and what each offers the training driver's evaluation.

The driver (`jaxsd.training.run`) asks this module, by dataset name, whether to prepare the dataset and
what to judge samples on; it knows no dataset by name itself. A dataset of one's own (an image folder)
is prepared beforehand and gets the generic sample prompts and no judged report.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from jaxsd.data import shapes


@dataclasses.dataclass(frozen=True)
class JudgedPrompts:
  """How samples of a labelled dataset are judged: the independent judge's attributes (ClassLabel
  features of the dataset, with their class names), prompts with the class each asks for, and how to
  lay them out."""

  attributes: dict[str, tuple[str, ...]]
  prompts: list[str]
  labels: dict[str, np.ndarray]  # attribute -> class index per prompt
  grid_columns: int  # the prompt-match grid: prompts per row
  grid_caption: str  # what the grid's rows and columns are, for report.md
  # The trained CLIP's zero-shot second opinion: attributes it picks among, and the caption of a choice.
  clip_attributes: dict[str, tuple[str, ...]]
  clip_caption: Callable[..., str]
  # The report's confusion tables split each attribute's rows by this one's asked class (None: not split).
  confusion_split: str | None = None


@dataclasses.dataclass(frozen=True)
class Builtin:
  prepare: Callable[[str, str], object]  # (data_dir, name) -> prepares the dataset (a no-op when there)
  sample_prompts: list[str]  # the U-Net stage's sample grid during training
  sample_grid_columns: int
  judged: JudgedPrompts | None = None
  mask_key: str | None = None  # a feature marking each image's subject (`vae.` / `unet.foreground_loss_weight`)


def _shapes() -> Builtin:
  prompts, labels = shapes.canonical_prompts()
  judged = JudgedPrompts(
      attributes=dict(shapes.JUDGED), prompts=prompts, labels=labels,
      grid_columns=len(shapes.SIZES) * len(shapes.POSITIONS),
      grid_caption="One row per colour x shape; columns: small then large, each at left, right, top, bottom, "
      "center.", clip_attributes={
          "color": shapes.COLORS,
          "shape": shapes.SHAPES
      }, clip_caption=lambda color, shape: shapes.caption_for(shape, color),
      confusion_split="size")  # small shapes are the hard ones: small circles and squares get confused
  sample = [shapes.caption_for(s, c) for c in shapes.COLORS for s in shapes.SHAPES]
  return Builtin(prepare=lambda data_dir, name: shapes.prepare_named(data_dir, name), sample_prompts=sample,
                 sample_grid_columns=len(shapes.SHAPES), judged=judged, mask_key="mask")


GENERIC_SAMPLE_PROMPTS = ("a photo of a cat", "a painting of a lighthouse", "a red car", "a bowl of fruit")


def lookup(name: str) -> Builtin | None:
  """The built-in dataset a TFDS name refers to ("shapes/32x32", "shapes/32x32_n512_128_s0"), or None."""
  if shapes.is_shapes(name):
    return _shapes()
  return None


def sample_prompts(name: str, configured: Sequence[str] = ()) -> tuple[list[str], int | None]:
  """(prompts, grid columns) for the training sample grid: the configured ones, else the dataset's."""
  if configured:
    return list(configured), None
  found = lookup(name)
  if found is not None:
    return list(found.sample_prompts), found.sample_grid_columns
  return list(GENERIC_SAMPLE_PROMPTS), None
