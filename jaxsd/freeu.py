"""FreeU (Si et al., 2023) on the pipelines, as diffusers' `pipe.enable_freeu(s1, s2, b1, b2)` / `disable_freeu()`.

    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)   # SD 1.4 / 1.5, the FreeU authors' values
    images = pipe(prompts)                             # text-to-image, img2img, inpaint, ControlNets, SDXL
    pipe.disable_freeu()                               # the plain programs and images again, bit for bit

The U-Net's first two up blocks scale half of their backbone channels by b1 / b2 and Fourier-filter their skip
features (the lowest frequencies times s1 / s2): `jaxsd.models.freeu`. The four factors are an input of the compiled
program, so other values compile nothing (the first call with FreeU on traces the program once more); with FreeU off
the program gets no input and is today's. As diffusers' blocks (`is_freeu_enabled`: the truth of each factor), a
factor of 0 leaves FreeU off.
"""

from __future__ import annotations

import logging
import numbers

import jax.numpy as jnp

from jaxsd.config import finite32

NAMES = ("s1", "s2", "b1", "b2")
# The FreeU authors' values, as diffusers' docs give them (https://github.com/ChenyangSi/FreeU).
RECOMMENDED = {
    "sd1": (0.9, 0.2, 1.5, 1.6),  # SD 1.4 / 1.5
    "sd2": (0.9, 0.2, 1.4, 1.6),  # SD 2.1
    "sdxl": (0.6, 0.4, 1.1, 1.2),
}
log = logging.getLogger(__name__)


def check_factors(values, where: str = "enable_freeu") -> tuple[float, float, float, float]:
  """(s1, s2, b1, b2) as floats, or a ValueError naming `where` and the factor that is not a finite number (in
  float32, the program's dtype)."""
  values = tuple(values)
  if len(values) != 4:
    raise ValueError(f"{where}: FreeU takes four factors (s1, s2, b1, b2), got {len(values)}.")
  for name, v in zip(NAMES, values):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not finite32(v):
      raise ValueError(f"{where}: {name}={v!r} must be a finite number (the FreeU authors' SD 1.5 values: s1 0.9, "
                       "s2 0.2, b1 1.5, b2 1.6).")
  return tuple(float(v) for v in values)


class FreeUMixin:
  """`enable_freeu` / `disable_freeu` for a `jaxsd.pipeline.StableDiffusion` (SDXL and the ControlNet pipelines
  too), as diffusers' pipelines'."""

  @property
  def freeu(self) -> tuple[float, float, float, float] | None:
    """The factors (s1, s2, b1, b2) `enable_freeu` set, or None."""
    return self.__dict__.get("_freeu")

  def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
    """Turns FreeU on for every later call (all tasks), as diffusers' `enable_freeu`: in the U-Net's first two up
    blocks the first half of the backbone's channels is scaled by b1 (first block) and b2 (second), and the skip
    features' lowest frequencies by s1 and s2. Values the FreeU authors give: SD 1.4 / 1.5 (0.9, 0.2, 1.5, 1.6), SD 2.1
    (0.9, 0.2, 1.4, 1.6), SDXL (0.6, 0.4, 1.1, 1.2) (`RECOMMENDED`). Each must be a finite number; as in diffusers,
    whose blocks test each factor's truth, a factor of 0 leaves FreeU off."""
    values = check_factors((s1, s2, b1, b2))
    if 0.0 in values:
      log.warning("enable_freeu%s: a factor of 0 leaves FreeU off, as in diffusers.", values)
    self.__dict__["_freeu"] = values

  def disable_freeu(self) -> None:
    """Turns FreeU off (diffusers' `disable_freeu`): the plain programs and images again."""
    self.__dict__.pop("_freeu", None)

  def freeu_inputs(self) -> dict:
    """The program's FreeU input: {"freeu": (s1, s2, b1, b2) as a float32 array}, or {} when FreeU is off (not
    enabled, or a factor is 0, as diffusers' `is_freeu_enabled`)."""
    values = self.freeu
    if values is None or 0.0 in values:
      return {}
    return {"freeu": jnp.asarray(values, jnp.float32)}
