"""Training logs: JSON lines, TensorBoard event files (tensorboardX, no TensorFlow) and tqdm.

Only process 0 writes. `<workdir>/metrics.jsonl` gets one object per logged step
(`{"step": ..., "loss": ..., ...}`); after a resume, steps past the restored checkpoint appear
again (the later line is the one that counts). Event files go to `<workdir>/tensorboard`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Mapping

import jax
import numpy as np

log = logging.getLogger(__name__)


def _to_float(v: Any) -> float | None:
  try:
    f = float(np.asarray(v))
  except (TypeError, ValueError):
    return None
  return f


class MetricWriter:
  """Writes scalars to JSON lines and TensorBoard, images to TensorBoard."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    _end_partial_line(self.jsonl_path)
    self._jsonl = open(self.jsonl_path, "a", buffering=1)  # Line-buffered: survives a kill.
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Scalars (python, numpy or fetched jax values); non-finite ones: JSON null, no TB point."""
    if not self.enabled:
      return
    row = {"step": int(step)}
    for k, v in scalars.items():
      f = _to_float(v)
      if f is None:
        continue
      row[k] = f if math.isfinite(f) else None
      if self._tb is not None and math.isfinite(f):  # tensorboardX warns on every NaN.
        self._tb.add_scalar(k, f, int(step))
    self._jsonl.write(json.dumps(row) + "\n")

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Images as HWC (or HW) arrays, uint8 or float in [0, 1] (a sample grid, for example)."""
    if not self.enabled or self._tb is None:
      return
    for k, img in images.items():
      img = np.asarray(img)
      if img.ndim == 2:
        img = img[..., None]
      if img.ndim != 3:
        raise ValueError(f"Image {k!r} has shape {img.shape}; expected HWC or HW (make a grid "
                         "of a batch first).")
      if img.dtype != np.uint8:
        img = np.clip(img.astype(np.float32), 0.0, 1.0)
      self._tb.add_image(k, img, int(step), dataformats="HWC")

  def write_text(self, step: int, texts: Mapping[str, str]) -> None:
    if not self.enabled or self._tb is None:
      return
    for k, t in texts.items():
      self._tb.add_text(k, t, int(step))

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _end_partial_line(path: str) -> None:
  """Drops a last line cut short (a kill or a full disk in the middle of a write), so appending stays valid JSON
  lines; the cut row is logged."""
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return
  with open(path, "rb+") as f:
    data = f.read()
    if data.endswith(b"\n"):
      return
    keep = data.rfind(b"\n") + 1
    log.warning("%s ends in a cut line (%r): dropping it.", path, data[keep:keep + 80])
    f.truncate(keep)


def read_jsonl(path: str) -> list[dict]:
  """The rows of a metrics.jsonl file (a last line cut short, by a kill during its write, is left out)."""
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i < len(lines) - 1:
        raise ValueError(f"{path}: line {i + 1} is not JSON ({line[:80]!r}).") from None
      log.warning("%s: the last line is cut short; left out.", path)
  return rows


class ProgressBar:
  """A tqdm bar over train steps showing loss and images/s; silent off process 0 or disabled."""

  def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool = True):
    self._bar = None
    if enabled and jax.process_index() == 0:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)
    self._step = initial_step

  def update(self, step: int, loss: float | None = None, images_per_sec: float | None = None):
    if self._bar is None:
      return
    self._bar.update(step - self._step)
    self._step = step
    post = {}
    if loss is not None:
      post["loss"] = f"{loss:.4g}"
    if images_per_sec is not None:
      post["img/s"] = f"{images_per_sec:.1f}"
    if post:
      self._bar.set_postfix(post, refresh=False)

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None
