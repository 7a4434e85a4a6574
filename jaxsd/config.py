"""What config files spell: the base of the frozen config dataclasses that read and write diffusers /
transformers `config.json` files (networks and noise schedules alike), and the dtype names."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, TypeVar

import jax.numpy as jnp
import numpy as np

from jaxsd.files import written_whole

T = TypeVar("T", bound="ConfigBase")

# The dtype names of configs and flags (`config.dtype`, `python -m sample --dtype`).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def finite32(x) -> bool:
  """Whether a number (or every number of an array) is finite and stays finite in float32, the programs' dtype
  (1e39 is not): the check of scales and weights that reach a program (guidance, LoRA and ControlNet scales, prompt
  weights)."""
  a = np.asarray(x, np.float64)
  return bool(np.all(np.isfinite(a) & (np.abs(a) <= _FLOAT32_MAX)))


def _hashable(v: Any) -> Any:
  """Lists (nested ones too: SDXL's per-layer transformer depths) as tuples, so a config can be hashed."""
  return tuple(_hashable(x) for x in v) if isinstance(v, (list, tuple)) else v


def _all_sizes(v: Any) -> bool:
  if isinstance(v, (tuple, list)):
    return len(v) > 0 and all(_all_sizes(x) for x in v)
  return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _jsonable(v: Any) -> Any:
  if isinstance(v, tuple):
    return [_jsonable(x) for x in v]
  if dataclasses.is_dataclass(v):
    return v.to_dict()
  return v


def read_json_object(path: str) -> dict:
  """The JSON object (settings) in the file `path`; a ValueError that names the file when it is not valid JSON or
  holds something else (a list, a number)."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    out = json.loads(data)
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); fix or replace the file.") from None
  if not isinstance(out, dict):
    raise ValueError(f"{path} holds a JSON {type(out).__name__}, not an object of settings; fix or replace the file.")
  return out


def write_json_object(path: str, obj: Any, indent: int | None = None, sort_keys: bool = False) -> None:
  """Writes `obj` as JSON to `path` whole or not at all (a temporary file, then `os.replace`): a run killed while
  writing leaves the old file or the new one, never a truncated file that the resumed run cannot read."""
  with written_whole(path) as tmp, open(tmp, "w") as f:
    json.dump(obj, f, indent=indent, sort_keys=sort_keys)
    f.write("\n")


@dataclasses.dataclass(frozen=True)
class ConfigBase:
  """Base for network and scheduler configs: field names and defaults are those of the reference `config.json`.

  Keys of the file that the network does not use (`_class_name`, `_diffusers_version`, ...) are
  ignored; lists become tuples (nested ones too) so the config stays hashable (a flax module attribute).
  """

  @classmethod
  def from_dict(cls: type[T], d: dict[str, Any]) -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
      if k in names:
        kwargs[k] = _hashable(v) if isinstance(v, list) else v
    cfg = cls(**kwargs)
    cfg.validate()
    return cfg

  @classmethod
  def from_json(cls: type[T], path: str | os.PathLike) -> T:
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no config.json here; a model folder needs config.json next to its weights.")
    return cls.from_dict(read_json_object(path))

  def validate(self) -> None:
    """Raises ValueError for settings the network does not implement. Overridden per network."""

  def check_sizes(self, *names: str) -> None:
    """A ValueError naming the first of the fields `names` that is neither None nor a whole number >= 1 (or a
    non-empty list of them, nested for per-layer values): a zero width or head count, or a zero / negative count
    of layers, would otherwise fail as a division by zero or an empty network, far from the setting."""
    for name in names:
      value = getattr(self, name)
      if value is not None and not _all_sizes(value):
        what = "whole numbers >= 1" if isinstance(value, (tuple, list)) else "a whole number >= 1"
        raise ValueError(f"{type(self).__name__}: {name}={_jsonable(value)!r} must be {what}.")

  def replace(self: T, **kw) -> T:
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
