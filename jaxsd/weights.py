"""PyTorch state dicts <-> flax parameter trees (the files they live in: `jaxsd.model_folder`).

Flax parameter paths mirror the diffusers / transformers state-dict keys, so conversion is a
rename plus a transpose (the nanoGPT rule: equal key sets, equal shapes, named transposes):

  torch `down_blocks.0.resnets.1.conv1.weight`  <->  flax ('down_blocks_0', 'resnets_1', 'conv1', 'kernel')

- a numeric component joins its parent with "_" (flax's naming of submodule lists);
- `weight` becomes `kernel` (nn.Dense: (out, in) -> (in, out); nn.Conv: (O, I, kh, kw) -> (kh, kw, I, O)),
  `scale` (LayerNorm / GroupNorm) or `embedding` (nn.Embed), whichever the model has;
- everything else (bias, raw parameters such as CLIP's `logit_scale`) keeps its name.

Loading is strict: every missing key, unexpected key and shape mismatch is collected and reported
in one error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

# Torch names that end in "_<digits>" without being a list index.
_NOT_AN_INDEX = frozenset({"linear_1", "linear_2"})
# Buffers some checkpoints carry that are not parameters.
_IGNORED_KEY = re.compile(r"(^|\.)(position_ids|num_batches_tracked)$")
_WEIGHT_LEAVES = ("kernel", "scale", "embedding")

Path = tuple[str, ...]


class WeightLoadError(ValueError):
  """A checkpoint does not fit the model: lists the offending keys (the first `_LISTED` of each kind)."""


_LISTED = 20


def _first(lines: list[str]) -> list[str]:
  return lines if len(lines) <= _LISTED else lines[:_LISTED] + [f"  ... ({len(lines)} in all)"]


def torch_key_to_path(key: str) -> Path:
  """`a.b.0.c.weight` -> ('a', 'b_0', 'c', 'weight') (the leaf is renamed separately)."""
  out: list[str] = []
  for part in key.split("."):
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return tuple(out)


def path_to_torch_key(path: Path) -> str:
  """('a', 'b_0', 'c', 'kernel') -> `a.b.0.c.weight`."""
  parts = []
  for name in path[:-1]:
    m = re.fullmatch(r"(.+)_(\d+)", name)
    if m and name not in _NOT_AN_INDEX:
      parts.extend(m.groups())
    else:
      parts.append(name)
  leaf = path[-1]
  parts.append("weight" if leaf in _WEIGHT_LEAVES else leaf)
  return ".".join(parts)


def _to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel":
    if value.ndim == 4:
      return np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2:
      return np.transpose(value)
  return value


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel":
    if value.ndim == 4:
      return np.transpose(value, (3, 2, 0, 1))
    if value.ndim == 2:
      return np.transpose(value)
  return value


def _fmt(shape) -> str:
  return "(" + ", ".join(str(d) for d in shape) + ")"


def state_dict_to_params(
    state_dict: Mapping[str, Any],
    abstract_params: Any,
    dtype: Any = None,
    rename: Callable[[str], str] | None = None,
) -> dict:
  """Converts a PyTorch-layout state dict into the flax parameter tree `abstract_params` describes.

  Args:
    state_dict: key -> array (numpy, or anything `np.asarray` takes); read one key at a time, so a
      lazy mapping over a safetensors file keeps at most one converted tensor besides the result.
    abstract_params: the model's parameter tree (arrays or `jax.ShapeDtypeStruct`s, e.g. from
      `jax.eval_shape(model.init, ...)["params"]`).
    dtype: cast every tensor to this dtype (default: the dtype in `abstract_params`).
    rename: optional key rewrite applied first (legacy checkpoint names).

  Raises:
    WeightLoadError: naming every missing key, unexpected key and shape mismatch.
  """
  target: dict[Path, Any] = traverse_util.flatten_dict(_unfreeze(abstract_params))
  out: dict[Path, np.ndarray] = {}
  unexpected, mismatched, mismatched_paths = [], [], set()
  for key in state_dict.keys():
    name = rename(key) if rename else key
    if _IGNORED_KEY.search(name):
      continue
    path = torch_key_to_path(name)
    if path[-1] == "weight":
      for leaf in _WEIGHT_LEAVES:
        if path[:-1] + (leaf,) in target:
          path = path[:-1] + (leaf,)
          break
    if path not in target:
      unexpected.append(key)
      continue
    value = np.asarray(state_dict[key])
    value = _to_flax_layout(path[-1], value)
    want = target[path]
    if tuple(value.shape) != tuple(want.shape):
      mismatched.append(f"  {key}: checkpoint {_fmt(value.shape)} (flax layout), model {_fmt(want.shape)}")
      mismatched_paths.add(path)
      continue
    out[path] = value.astype(dtype or want.dtype, copy=False)
  missing = [path_to_torch_key(p) for p in target if p not in out and p not in mismatched_paths]
  if unexpected or missing or mismatched:
    lines = ["checkpoint does not match the model:"]
    if missing:
      lines.append(f"missing keys ({len(missing)}), left at no value — the checkpoint lacks them:")
      lines += _first([f"  {k}" for k in sorted(missing)])
    if unexpected:
      lines.append(f"unexpected keys ({len(unexpected)}) — the model has no such parameter:")
      lines += _first([f"  {k}" for k in sorted(unexpected)])
    if mismatched:
      lines.append(f"shape mismatches ({len(mismatched)}):")
      lines += _first(sorted(mismatched))
    lines.append("Check that the config.json beside the weights describes this checkpoint.")
    raise WeightLoadError("\n".join(lines))
  return traverse_util.unflatten_dict(out)


def _unfreeze(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _unfreeze(v) for k, v in tree.items()}
  return tree


def params_to_state_dict(params: Any, dtype: Any = None) -> dict[str, np.ndarray]:
  """The inverse of `state_dict_to_params`: flax tree -> {torch key: array in torch layout}."""
  flat = traverse_util.flatten_dict(_unfreeze(params))
  out = {}
  for path, value in flat.items():
    value = np.asarray(jax.device_get(value))
    if dtype is not None:
      value = value.astype(dtype)
    # np.asarray, not np.ascontiguousarray: the latter turns a 0-d parameter (logit_scale) into shape (1,).
    out[path_to_torch_key(path)] = np.asarray(_to_torch_layout(path[-1], value), order="C")
  return out
