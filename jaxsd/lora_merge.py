"""Applying LoRA adapters (`jaxsd.lora.Adapter`): merging their updates into the parameters they adapt, at weights
(one number, or per network and block: `jaxsd.block_scales`), and `AdapterSet`, the adapters a pipeline holds.

The merge is a small jitted program of its own (`merged_kernels`): the weights are its arguments, so new weights or
adapters never recompile the sampling program that takes the merged parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxsd import block_scales, lora_dora
from jaxsd.config import finite32
from jaxsd.lora import Adapter


def merge_kernel(kernel: jax.Array, updates) -> jax.Array:
  """kernel + sum scale * (down @ up).reshape(kernel.shape) over `updates` [(down, up, scale), ...], in order (up
  None: `down` is the update itself, a LyCORIS one); a (down, up, scale, magnitude) entry is a DoRA one as peft
  applies it, a (down, up, scale, magnitude, weight) one as A1111 (`jaxsd.lora_dora`); in fp32, cast back to the
  kernel's dtype (differentiable: LoRA training merges its adapters with it)."""
  base = kernel.astype(jnp.float32)
  acc = base
  for down, up, s, *dora in updates:
    update = down if up is None else jnp.matmul(down, up, precision=jax.lax.Precision.HIGHEST)
    delta = s * update.reshape(kernel.shape)
    if not dora:
      acc = acc + delta
    elif len(dora) == 1:
      acc = lora_dora.rescale(base, acc, delta, dora[0])
    else:  # A1111: the full DoRA weight of the weight so far, its difference times the adapter's weight
      acc = acc + dora[1] * (lora_dora.rescale(acc, acc, delta, dora[0]) - acc)
  return acc.astype(kernel.dtype)


@jax.jit
def merged_kernels(kernels: dict, updates: dict) -> dict:
  """{key: kernel} and {key: [(down, up, scale[, magnitude]), ...]} -> {key: `merge_kernel`}, in fp32, cast back.

  Jitted on its own: the scales are arguments, so new scales reuse the program; new adapters compile
  only this small function, never the sampling program that takes the merged parameters.
  """
  return {k: merge_kernel(w, updates[k]) for k, w in kernels.items()}


def merge(params: Mapping[str, Any], adapters: Sequence[tuple[Adapter, float | Mapping]]) -> dict[str, Any]:
  """`params` (network name -> tree: "unet", "text_encoder", "text_encoder_2", or some of them) with every
  adapter added at its weight: one number, or {network: number or per-block values} (`block_scales.lora_weight`;
  each layer's by `block_scales.lora_layer_weight`).

  Leaves no adapter touches are the same arrays as in `params` (not copies); so is a network no adapter touches
  (the same tree).
  """
  flat = {n: traverse_util.flatten_dict(t) for n, t in params.items() if t is not None}
  updates: dict[tuple, list] = {}
  for adapter, weight in adapters:
    for network, layers in adapter.layers.items():
      if network not in flat:  # e.g. merging only the U-Net
        continue
      table = weight.get(network, 1.0) if isinstance(weight, Mapping) else weight
      for path, f in layers.items():
        w = block_scales.lora_layer_weight(table, path)
        if f.blend:  # A1111's DoRA: the weight blends (lora_dora)
          entry = (f.down, f.up, np.float32(f.scale), f.magnitude, np.float32(w))
        else:
          entry = (f.down, f.up, np.float32(w * f.scale)) + (() if f.magnitude is None else (f.magnitude,))
        updates.setdefault((network,) + path, []).append(entry)
  kernels = {k: flat[k[0]][k[1:]] for k in updates}
  for k, w in merged_kernels(kernels, updates).items():
    flat[k[0]][k[1:]] = w
  touched = {k[0] for k in updates}
  return {n: traverse_util.unflatten_dict(flat[n]) if n in touched else t for n, t in params.items()}


class AdapterSet:
  """The adapters a pipeline holds, the weights of the active ones, and the merged parameters (cached).

  Switching adapters or weights changes only which kernels `merged_kernels` is given and the scales
  it multiplies by; whatever program takes the merged parameters sees the same shapes and dtypes.
  """

  def __init__(self):
    self.adapters: dict[str, Adapter] = {}
    self.weights: dict[str, float | dict] = {}  # the active adapters, in the order they were set (`merge`'s weights)
    self.fused: dict | None = None  # the pipeline's parameters before fuse_lora, by network (for unfuse_lora)
    self._cache: tuple | None = None  # (base trees, state, merged trees): the last merge

  def check_unfused(self, what: str) -> None:
    if self.fused is not None:
      raise ValueError(f"{what}: the LoRA adapters are fused into the weights; call unfuse_lora() first.")

  def add(self, adapter: Adapter, weight: float, name: str | None) -> str:
    self.check_unfused("load_lora")
    if name is None:
      name = next(f"default_{i}" for i in range(len(self.adapters) + 1) if f"default_{i}" not in self.adapters)
    if name in self.adapters:
      raise ValueError(f"an adapter named {name!r} is loaded already: pick another name or delete_adapters({name!r}).")
    weight = _check_weight(name, weight)
    self.adapters[name] = Adapter(
        {
            n: {
                p:
                    f._replace(down=jax.device_put(f.down), up=jax.device_put(f.up),
                               magnitude=None if f.magnitude is None else jax.device_put(f.magnitude))
                for p, f in layers.items()
            } for n, layers in adapter.layers.items()
        }, adapter.ignored)
    self.weights[name] = weight
    return name

  def _names(self, names) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in self.adapters]
    if unknown:
      raise ValueError(f"no adapter named {', '.join(map(repr, unknown))}; loaded: "
                       f"{', '.join(map(repr, self.adapters)) or 'none'}.")
    return names

  def set(self, names, weights=None, check: Callable[[str, Any], float | dict] | None = None) -> None:
    """Activates `names` at `weights`: None (1 each), one weight for all, or a list of one per name (None: 1), each
    checked by `check(name, weight)` (default: numbers only; pipelines pass `block_scales.lora_weight`)."""
    self.check_unfused("set_adapters")
    names = self._names(names)
    if not isinstance(weights, (list, tuple)):
      weights = [weights] * len(names)
    if len(weights) != len(names):
      raise ValueError(f"{len(weights)} weights for {len(names)} adapters: give one weight per adapter name.")
    check = check or (lambda n, w: _check_weight(n, 1.0 if w is None else w))
    self.weights = {n: check(n, w) for n, w in zip(names, weights)}

  def delete(self, names) -> None:
    self.check_unfused("delete_adapters")
    for n in self._names(names):
      del self.adapters[n]
      self.weights.pop(n, None)

  def clear(self) -> None:
    self.adapters, self.weights, self.fused, self._cache = {}, {}, None, None

  def apply(self, params: dict) -> dict:
    """`params` ({"unet": tree, "text_encoder": tree}) with the active adapters merged in (unchanged when
    none is active or they are fused)."""
    if not self.weights or self.fused is not None:
      return params
    state = tuple((n, id(self.adapters[n]), repr(w)) for n, w in self.weights.items())
    if self._cache and self._cache[1] == state and all(self._cache[0][n] is params[n] for n in params):
      return self._cache[2]
    merged = merge(params, [(self.adapters[n], w) for n, w in self.weights.items()])
    self._cache = (dict(params), state, merged)
    return merged


def _check_weight(name: str, weight) -> float:
  if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating, np.integer)) or not finite32(weight):
    raise ValueError(f"adapter {name!r}: weight {weight!r} must be a finite number (1: as trained, 0: off).")
  return float(weight)
