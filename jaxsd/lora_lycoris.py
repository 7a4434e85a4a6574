"""LyCORIS LoHa, LoKr and Tucker LoCon adapters (KohakuBlueleaf's LyCORIS), as A1111's Lora extension and ComfyUI
apply them.

Such files name their layers as kohya's LoRA files do (`lora_unet_…`, `lora_te_…`, `jaxsd.lora_names`) and hold,
per layer, instead of `lora_down` / `lora_up` (PyTorch layout, W (out, in[, kh, kw])):

- LoHa (Hadamard product, A1111 `network_hada.py`, ComfyUI `comfy/weight_adapter/loha.py`): `hada_w1_a` (out, r),
  `hada_w1_b` (r, in * kh * kw), `hada_w2_a`, `hada_w2_b` likewise; ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) reshaped to
  W's shape. With Tucker factors (`hada_t1` / `hada_t2` (r, r, kh, kw), then `w*_a` (r, out) and `w*_b` (r, in)) a
  half is einsum("ijkl,jr,ip->prkl", t, w_b, w_a) (A1111's `lyco_helpers.make_weight_cp`). Rank r = w1_b.shape[0].
- LoKr (Kronecker product, A1111 `network_lokr.py`, ComfyUI `lokr.py`): w1 = `lokr_w1` or `lokr_w1_a @ lokr_w1_b`,
  w2 = `lokr_w2` (2-D, or 4-D for a convolution) or `lokr_w2_a @ lokr_w2_b` or, with `lokr_t2`, the Tucker einsum
  above; ΔW = kron(w1, w2) (w1 given two trailing 1 axes when w2 is 4-D) reshaped to W's shape. The rank is
  w1_b.shape[0] when w1 is decomposed, w2_b.shape[0] when w2 is (that one wins): none when both are whole.
- LoCon with Tucker (A1111 `network_lora.py` with `lora_mid`, `lyco_helpers.rebuild_cp_decomposition`): on a kxk
  convolution `lora_down` (r, in, 1, 1), `lora_mid` (r, r, kh, kw), `lora_up` (out, r, 1, 1);
  ΔW = einsum("nmkl,in,mj->ijkl", mid, up, down), rank r = lora_down.shape[0].
- Full (LyCORIS `algo=full`, A1111 `network_full.py`, ComfyUI's "diff" patches in `comfy/lora.py`): `diff` is ΔW
  itself (W's shape), the optional `diff_b` ΔB of the layer's bias.
- Norm (LyCORIS `train_norm`, A1111 `network_norm.py`, ComfyUI likewise): `w_norm` / `b_norm` are the updates of a
  GroupNorm's or LayerNorm's weight (flax `scale`) and bias, both required as A1111 requires them.

The scale is alpha / rank (A1111's `NetworkModule.calc_scale`), 1 without an `.alpha` key or without a rank (a LoKr
with w1 and w2 both whole scales by 1 whatever its alpha says; LyCORIS itself saves alpha = rank then). A layer's
weight then is W + w * scale * ΔW (`finalize_updown`), and with a `dora_scale` A1111's DoRA blend
(`jaxsd.lora_dora`) on top of that update. Full and norm layers have no rank: their scale is 1 (`whole`).

These updates are not low-rank products jaxsd could keep as (down, up): each layer's ΔW is computed once, on load,
in float64 and kept in fp32 in the flax kernel's layout, so an adapter takes as much memory as the layers it adapts
(a full-size copy of each adapted kernel, fp32). ΔW depends on the file only; the adapter weight and scale stay
arguments of the jitted merge (`jaxsd.lora_merge.merged_kernels`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
FULL = ("diff", "diff_b")  # the weight's update, the bias's
NORM = ("w_norm", "b_norm")  # the same on a GroupNorm / LayerNorm
WHOLE = FULL + NORM  # roles that may also target a norm's scale (`jaxsd.lora.weight_modules`)
ROLES = frozenset(LOHA + LOKR + WHOLE + ("lora_mid",))
# The roles' suffixes, for `jaxsd.lora_names.KEY`:
KEY_SUFFIX = r"hada_(?:w[12]_[ab]|t[12])|lokr_(?:w[12](?:_[ab])?|t2)|lora_mid\.weight|diff(?:_b)?|[wb]_norm"


def _shape(shape) -> str:
  return str(tuple(int(d) for d in shape))


def kind(group: Mapping[str, object]) -> str | None:
  """"LoHa" / "LoKr" / "Tucker LoCon" / "full" / "norm" for a layer's roles (file suffixes -> arrays), None for a
  LoRA layer."""
  if any(r in group for r in FULL):
    return "full"
  if any(r in group for r in NORM):
    return "norm"
  if any(r in group for r in LOHA):
    return "LoHa"
  if any(r in group for r in LOKR):
    return "LoKr"
  return "Tucker LoCon" if "lora_mid" in group else None


def missing(group: Mapping[str, object]) -> str | None:
  """What a LyCORIS layer lacks to be complete ("hada_w2_b", "lokr_w1 or lokr_w1_a/lokr_w1_b"), or None. As A1111's
  `ModuleTypeFull` / `ModuleTypeNorm`: a full layer needs `diff` (`diff_b` is optional), a norm layer both
  `w_norm` and `b_norm` (ComfyUI would apply either alone)."""
  if kind(group) == "full":
    return None if "diff" in group else "diff"
  if kind(group) == "norm":
    return "/".join(r for r in NORM if r not in group) or None
  if kind(group) == "LoHa":
    lacking = [r for r in LOHA[:4] if r not in group]
    return "/".join(lacking) or None
  if kind(group) == "Tucker LoCon":
    return "/".join(f"lora_{r}" for r in ("down", "up") if r not in group) or None
  for i in ("1", "2"):
    if f"lokr_w{i}" not in group and not (f"lokr_w{i}_a" in group and f"lokr_w{i}_b" in group):
      return f"lokr_w{i} or lokr_w{i}_a/lokr_w{i}_b"
  return None


def mixed(group: Mapping[str, object]) -> str | None:
  """What a full or norm layer wrongly holds besides its updates ("both LyCORIS full (diff) and other factors (down,
  up)", ...), else None: refused whatever `strict` says, since leaving the layer out would drop those too."""
  if kind(group) not in ("full", "norm"):
    return None
  what = f"LyCORIS {kind(group)} ({', '.join(r for r in (FULL if kind(group) == 'full' else NORM) if r in group)})"
  if kind(group) == "full" and any(r in group for r in NORM):
    return f"both a {what} and a norm (w_norm / b_norm) update"
  others = sorted(r for r in group if r not in WHOLE + ("alpha",))
  if others == ["magnitude"]:
    return f"a dora_scale on a {what} layer, which is not supported"
  if others:
    return f"both {what} and other factors ({', '.join(others)})"
  return None


def _float64(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor (bf16 has no numpy dtype)
    value = value.detach().cpu().double()
  return np.asarray(value, np.float64)


def _tucker(t: np.ndarray, w_a: np.ndarray, w_b: np.ndarray) -> np.ndarray:
  """A Tucker-decomposed factor: t (r, r, kh, kw), w_a (r, out), w_b (r, in) -> (out, in, kh, kw)."""
  return np.einsum("ijkl,jr,ip->prkl", t, w_b, w_a)


def _product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """a @ b with both flattened to matrices as A1111's `rebuild_conventional`: (out, r) @ (r, in * kh * kw)."""
  return a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)


def _loha(g: dict) -> tuple[list[np.ndarray], int]:
  halves = []
  for i in ("1", "2"):
    w_a, w_b, t = g[f"hada_w{i}_a"], g[f"hada_w{i}_b"], g.get(f"hada_t{i}")
    halves.append(_product(w_a, w_b) if t is None else _tucker(t, w_a, w_b))
  return halves, g["hada_w1_b"].shape[0]


def _lokr(g: dict) -> tuple[list[np.ndarray], int | None]:
  rank = None
  w1 = g.get("lokr_w1")
  if w1 is None:
    w1, rank = g["lokr_w1_a"] @ g["lokr_w1_b"], g["lokr_w1_b"].shape[0]
  w2 = g.get("lokr_w2")
  if w2 is None:
    w2_a, w2_b, t = g["lokr_w2_a"], g["lokr_w2_b"], g.get("lokr_t2")
    w2, rank = (_product(w2_a, w2_b) if t is None else _tucker(t, w2_a, w2_b)), w2_b.shape[0]
  if w2.ndim == 4:
    w1 = w1.reshape(w1.shape[:2] + (1, 1))
  return [np.kron(w1, w2)], rank


def _locon(g: dict) -> tuple[list[np.ndarray], int]:
  down, up = g["down"].reshape(g["down"].shape[0], -1), g["up"].reshape(g["up"].shape[0], -1)
  return [np.einsum("nmkl,in,mj->ijkl", g["lora_mid"], up, down)], down.shape[0]


def update(where: str, group: Mapping[str, object], kernel_shape: tuple[int, ...]) -> tuple[np.ndarray, int | None]:
  """(ΔW in the flax kernel's layout and shape, fp32; the rank for the scale, None if it has none) of a complete LoHa
  / LoKr / Tucker LoCon layer (`missing` None; lora_down / lora_up as the roles "down" / "up") whose flax kernel has
  `kernel_shape`; ValueError naming the shapes if it fits not."""
  g = {r: _float64(v) for r, v in group.items() if r in ROLES or r in ("down", "up")}
  what = kind(g)
  if what != "Tucker LoCon" and ("down" in g or "up" in g):
    raise ValueError(f"{where}: both LoRA (lora_down / lora_up) and {what} factors for one layer.")
  try:
    parts, rank = {"LoHa": _loha, "LoKr": _lokr, "Tucker LoCon": _locon}[what](g)
  except ValueError as e:  # factors whose inner dimensions disagree
    shapes = ", ".join(f"{r} {_shape(v.shape)}" for r, v in g.items())
    raise ValueError(f"{where}: the {what} factors do not fit each other ({shapes}): {e}.") from None
  if len(kernel_shape) == 2:
    torch_shape = kernel_shape[::-1]
  else:
    kh, kw, fan_in, features = kernel_shape
    torch_shape = (features, fan_in, kh, kw)
  if any(p.shape[0] != torch_shape[0] or p.size != np.prod(torch_shape) for p in parts):
    built = " and ".join(_shape(p.shape) for p in parts)
    raise ValueError(f"{where}: its {what} factors make an update of shape {built} but the layer's weight is "
                     f"{_shape(torch_shape)} (PyTorch layout): is the adapter for another model?")
  delta = np.prod([p.reshape(torch_shape) for p in parts], axis=0)  # a LoHa's halves: (out, in * kh * kw) or 4-D
  delta = delta.T if delta.ndim == 2 else delta.transpose(2, 3, 1, 0)  # PyTorch -> flax layout
  return np.ascontiguousarray(delta, np.float32), rank


def whole(where: str, group: Mapping[str, object], weight_shape: tuple[int, ...], kernel: bool,
          bias_shape: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray | None]:
  """(ΔW in the flax layout and shape of the layer's weight leaf, ΔB of its bias or None), fp32, of a complete full
  (`diff`, `diff_b`) or norm (`w_norm`, `b_norm`) layer; `kernel`: the leaf is a Dense / Conv kernel (else a norm's
  scale, no transpose); `bias_shape` None: the layer has no bias. ValueError naming the shapes if they fit not.

  Both are the updates themselves, added at the adapter's weight and no other scale: A1111's `NetworkModuleFull` /
  `NetworkModuleNorm` have no rank, so `calc_scale` is 1 whatever the alpha, and `finalize_updown` multiplies the
  bias update (`ex_bias`) by the multiplier only; ComfyUI's "diff" patches add strength * diff likewise."""
  if mixed(group):
    raise ValueError(f"{where}: {mixed(group)} for one layer.")
  w_role, b_role = FULL if kind(group) == "full" else NORM
  g = {r: _float64(v) for r, v in group.items() if r in WHOLE}
  torch_shape = tuple(weight_shape)  # a norm's scale: (C,) in both
  if kernel and len(weight_shape) == 2:
    torch_shape = torch_shape[::-1]  # (in, out) -> (out, in)
  elif kernel:
    kh, kw, fan_in, features = weight_shape
    torch_shape = (features, fan_in, kh, kw)
  delta = g[w_role]
  if delta.ndim == 0 or delta.shape[0] != torch_shape[0] or delta.size != np.prod(torch_shape):
    raise ValueError(f"{where}: its {w_role} has shape {_shape(delta.shape)} but the layer's weight is "
                     f"{_shape(torch_shape)} (PyTorch layout): is the adapter for another model?")
  delta = delta.reshape(torch_shape)  # as A1111's finalize_updown: (out, in) for (out, in, 1, 1) and back
  if kernel:
    delta = delta.T if delta.ndim == 2 else delta.transpose(2, 3, 1, 0)  # PyTorch -> flax layout
  bias = g.get(b_role)
  if bias is not None:
    if bias_shape is None:
      raise ValueError(f"{where}: its {b_role} updates the layer's bias, but the layer has none.")
    if bias.size != np.prod(bias_shape):
      raise ValueError(f"{where}: its {b_role} has shape {_shape(bias.shape)} but the layer's bias is "
                       f"{_shape(bias_shape)}: is the adapter for another model?")
    bias = np.ascontiguousarray(bias.reshape(bias_shape), np.float32)
  return np.ascontiguousarray(delta, np.float32), bias


def scale(alpha: float | None, rank: int | None) -> float:
  """A1111's `calc_scale`: alpha / rank, 1 when the file has no alpha or the update no rank."""
  return 1.0 if alpha is None or rank is None else alpha / rank
