"""LoRA adapters made elsewhere, as low-rank updates of jaxsd's U-Net and text-encoder parameters: reading them.
Writing them is `jaxsd.lora_export`, applying them (at weights, several at once) `jaxsd.lora_merge`.

Reads the formats in circulation and maps every key onto a Dense or Conv kernel (or a norm layer) of the parameter
trees (whose paths mirror the PyTorch state-dict keys, see `jaxsd.weights`):

- diffusers / PEFT: `unet.<module>.lora_A.weight` / `lora_B.weight`, `text_encoder.<module>...`;
  the older `<module>.lora.down/up.weight`, `<module>.lora_linear_layer.down/up.weight` and
  `<attention>.processor.to_q_lora.down.weight` spellings diffusers still loads; the adapter config
  (`lora_alpha`, `alpha_pattern`, `use_rslora`) from the safetensors metadata diffusers writes;
- kohya sd-scripts / A1111 / ComfyUI: `lora_unet_<module with _ for .>.lora_down.weight`,
  `.lora_up.weight`, `.alpha`, `lora_te_...` for the text encoder, conv LoRA (LoCon) on any
  convolution (a kxk `lora_down` with a 1x1 `lora_up`);
- SDXL: `text_encoder_2.…` keys, kohya's `lora_te1_` (CLIP ViT-L, `text_encoder`) and `lora_te2_`
  (OpenCLIP bigG, `text_encoder_2`), and sd-scripts' sgm names of the SDXL U-Net's layers
  (`lora_unet_input_blocks_4_1_…`, see `jaxsd.lora_names`).

A layer's update is `scale * up @ down` in PyTorch layout with scale = alpha / rank (no alpha:
1, as diffusers and kohya; alpha / sqrt(rank) for rsLoRA). Here it is kept in the kernel's flax
layout: `down` (fan_in, r) over the kernel's input axes flattened in flax order and `up` (r, features),
so that `kernel + s * (down @ up).reshape(kernel.shape)` is the merged kernel.

DoRA adapters load too, in every format and network above: PEFT's `lora_magnitude_vector` (diffusers' `use_dora`)
and the `dora_scale` of kohya-style files (LyCORIS, OneTrainer); the merged kernel is then rescaled per channel as
peft's DoRA forward does (`jaxsd.lora_dora`, which also says how several adapters and adapter weights combine).
diffusers 0.42 itself drops `dora_scale` keys with a warning (`StableDiffusionLoraLoaderMixin.lora_state_dict`) and
so loads such a file as plain LoRA; jaxsd applies them.

LyCORIS LoHa (`hada_w1_a`, ..., optional Tucker `hada_t1` / `hada_t2`), LoKr (`lokr_w1` or `lokr_w1_a` /
`lokr_w1_b`, `lokr_w2` or `lokr_w2_a` / `lokr_w2_b`, optional `lokr_t2`) and Tucker LoCon (`lora_mid`) layers in
kohya-named files load as A1111's Lora extension applies them, on linear layers, convolutions of any size and the text
encoders, with `dora_scale` too (`jaxsd.lora_lycoris`): their update is no low-rank product, so such a layer's
`Factors` holds its whole update ΔW (`up` None) and takes the memory of the kernel it adapts. diffusers does not load
them. LyCORIS' full layers (`diff`: the whole ΔW of a Dense or Conv kernel, with an optional `diff_b`: ΔB of its
bias) and norm layers (`w_norm` and `b_norm`: ΔW and ΔB of a GroupNorm's or LayerNorm's scale and bias: `norm1`,
`norm2`, `norm`, `conv_norm_out`, a transformer block's `norm1/2/3`, the text encoders' `layer_norm1/2` and
`final_layer_norm`; sgm names such as `in_layers_0` too) load as well, as A1111 applies them: W + w * ΔW and
b + w * ΔB at the adapter's weight w, no alpha (`jaxsd.lora_lycoris.whole`); such an adapter's layers include `scale`
and `bias` leaves. A1111 itself finds SD 1.x's `conv_norm_out` and `final_layer_norm` under no name (its diffusers ->
LDM renaming lacks them) and skips them; jaxsd applies every layer a file names, as ComfyUI does the U-Net's.
Still refused, by name: OFT, (IA)^3, a lora_B bias (PEFT's lora_bias), and the weight-shaped `.bias` that A1111 adds to
a layer's ΔW (ComfyUI ignores it; no trainer in circulation writes it).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from flax import traverse_util

from jaxsd import hub, lora_dora, lora_lycoris, lora_names, token_embeddings, weights

NETWORKS = ("unet", "text_encoder", "text_encoder_2")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry (PEFT's LoraConfig, per network)
Path = tuple[str, ...]

_DIFFUSERS = re.compile(
    r"(?:(unet|text_encoder_2|text_encoder)\.)?(.+?)\.(lora_A\.weight|lora_B\.weight|lora\.down\.weight|"
    r"lora\.up\.weight|lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|alpha|"
    r"lora_magnitude_vector(?:\.weight)?)")
# diffusers' attention-processor format (< 0.22): the projection is named in the processor's weight.
_PROCESSOR = re.compile(
    r"(?:(unet|text_encoder_2|text_encoder)\.)?(.+?)\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_PROCESSOR_TARGET = {
    "unet": {
        "to_q": "to_q",
        "to_k": "to_k",
        "to_v": "to_v",
        "to_out": "to_out.0"
    },
    "text_encoder": {
        "to_q": "q_proj",
        "to_k": "k_proj",
        "to_v": "v_proj",
        "to_out": "out_proj"
    },
}
_PROCESSOR_TARGET["text_encoder_2"] = _PROCESSOR_TARGET["text_encoder"]
_ROLE = {
    "down": "down",
    "up": "up",
    "lora_A": "down",
    "lora_B": "up",
    "lora_down": "down",
    "lora_up": "up",
    "lora_magnitude_vector": "magnitude",
    "dora_scale": "magnitude"
}
# Adapter types that are not LoRA (or LoRA plus something): named in the error so the user knows why.
_OTHER_KINDS = (
    (r"lora_B\.bias", "LoRA with a bias (lora_bias)"),
    (r"^lora_(unet|te[12]?)_[^.]+\.bias$", "A1111's weight-shaped .bias (added to a layer's ΔW)"),
    (r"(^|[._])oft_", "OFT"),
    (r"\.on_input$", "(IA)^3"),
)


class Factors(NamedTuple):
  """One layer's update, kernel + scale * (down @ up).reshape(kernel.shape) (DoRA: rescaled, see `jaxsd.lora_dora`);
  with `up` None (LyCORIS LoHa / LoKr / full / norm, `jaxsd.lora_lycoris`), kernel + scale * down: `down` is the whole
  update, of a kernel or (full and norm layers) of a norm's scale or a layer's bias."""
  down: Any  # (fan_in, r): the kernel's input axes (kh, kw, in) flattened in flax order; or ΔW (kernel_shape)
  up: Any  # (r, features); None when `down` is the whole update
  scale: float  # alpha / r (or alpha / sqrt(r) for rsLoRA); 1 for LyCORIS full and norm layers
  kernel_shape: tuple[int, ...]  # the flax kernel's: (in, out) for Dense, (kh, kw, in, out) for Conv; or the leaf's
  magnitude: Any = None  # DoRA's, fp32, broadcasting against the kernel along the axis it scales; None: plain LoRA
  blend: bool = False  # DoRA from a kohya-style file: its weight blends W and the DoRA weight, as A1111 (lora_dora)


@dataclasses.dataclass(frozen=True)
class Adapter:
  """A LoRA adapter mapped onto a model: network ("unet" / "text_encoder") -> parameter path -> Factors (a kernel's
  path; LyCORIS full and norm layers also a norm's `scale` and a layer's `bias`)."""
  layers: dict[str, dict[Path, Factors]]
  ignored: tuple[str, ...] = ()  # keys of the file that map to no layer (loaded with strict=False)

  @property
  def num_layers(self) -> int:
    return sum(len(v) for v in self.layers.values())


def read(source) -> tuple[dict[str, np.ndarray], dict]:
  """(state dict as numpy, adapter metadata) of a LoRA file, a folder holding `pytorch_lora_weights.safetensors` (or
  one other .safetensors file), or a state dict (numpy / torch tensors; metadata then empty)."""
  if isinstance(source, Mapping):
    return {k: _numpy(v) for k, v in source.items()}, {}
  path = hub.resolve(source, select=_hub_lora_file)  # a file, a folder or a Hub id ("owner/name")
  if os.path.isdir(path):
    path = _weight_file(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such LoRA file; pass a .safetensors file (or a folder holding {WEIGHT_NAME}).")
  if not path.endswith(".safetensors"):
    raise ValueError(f"{path}: LoRA files are read as .safetensors only (a pickled .bin/.pt/.ckpt can run code when "
                     "loaded); convert it first.")
  from safetensors import safe_open

  try:
    with safe_open(path, framework="numpy") as f:
      meta = f.metadata() or {}
      state_dict = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # pylint: disable=broad-except  # safetensors raises its own error types
    raise ValueError(f"{path}: not a readable safetensors file ({e}).") from None
  try:
    config = json.loads(meta.get(METADATA_KEY, "{}"))
  except json.JSONDecodeError:
    raise ValueError(f"{path}: its {METADATA_KEY!r} metadata is not JSON.") from None
  return state_dict, config


def _weight_file(folder: str) -> str:
  return os.path.join(folder, _lora_file_of(os.listdir(folder), folder))


def _hub_lora_file(files: set[str]) -> list[str]:
  """The file to fetch of a Hub repository's listing (`_lora_file_of` its top folder)."""
  return [_lora_file_of([f for f in files if "/" not in f], "the repository")]


def _lora_file_of(names: Sequence[str], where: str) -> str:
  """The LoRA file among a folder's file names: pytorch_lora_weights.safetensors, else its one .safetensors file (as
  diffusers' load_lora_weights guesses; learned token embeddings and training checkpoints are not LoRA files)."""
  if WEIGHT_NAME in names:
    return WEIGHT_NAME
  not_lora = (token_embeddings.WEIGHT_NAME, "scheduler", "optimizer", "checkpoint")
  files = sorted(f for f in names if f.endswith(".safetensors") and not any(w in f for w in not_lora))
  if len(files) > 1:
    raise hub.Refused(f"{where} holds {len(files)} .safetensors files and no {WEIGHT_NAME}: pass the LoRA file "
                      f"itself ({_listed(files)}).")
  return files[0] if files else WEIGHT_NAME


def _numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor (bf16 has no numpy dtype)
    value = value.detach().cpu().float()
  return np.asarray(value)


def kernel_modules(params: Any, prefix: str = "") -> dict[str, tuple[Path, tuple[int, ...]]]:
  """PyTorch module name -> (kernel path, kernel shape) for every Dense and Conv layer of a parameter tree."""
  out = {}
  for path, leaf in traverse_util.flatten_dict(params).items():
    if path[-1] == "kernel":
      out[prefix + weights.path_to_torch_key(path).removesuffix(".weight")] = (path, tuple(leaf.shape))
  return out


def weight_modules(params: Any) -> dict[str, tuple[Path, tuple[int, ...]]]:
  """`kernel_modules` and the GroupNorm / LayerNorm layers (their `scale`, PyTorch's `weight`): the layers LyCORIS'
  full and norm updates may target (A1111 patches Linear, Conv2d, GroupNorm and LayerNorm)."""
  out = {}
  for path, leaf in traverse_util.flatten_dict(params).items():
    if path[-1] in ("kernel", "scale"):
      out[weights.path_to_torch_key(path).removesuffix(".weight")] = (path, tuple(leaf.shape))
  return out


def _parse_key(key: str) -> tuple[str | None, str, str] | None:
  """(network or None, module name, role "down" / "up" / "alpha"), or None for a key of no LoRA format."""
  m = lora_names.KEY.fullmatch(key)
  if m:
    suffix = m[3].split(".")[0]
    return lora_names.network_of(m[1]), "kohya:" + m[2], _ROLE.get(suffix, suffix)  # "alpha", "hada_w1_a", ...
  m = _PROCESSOR.fullmatch(key)
  if m:
    network = m[1] or "unet"
    return m[1], f"{m[2]}.{_PROCESSOR_TARGET[network][m[3]]}", m[4]
  m = _DIFFUSERS.fullmatch(key)
  if m:
    role = m[3].removesuffix(".weight")
    role = "alpha" if role == "alpha" else _ROLE[role.split(".")[-1] if "." in role else role]
    return m[1], m[2], role
  return None


def _pattern_value(patterns: Mapping[str, Any], module: str, default):
  """PEFT's rank_pattern / alpha_pattern lookup: a key matches the module name or a suffix of it at a dot."""
  for pattern, value in patterns.items():
    body = pattern[1:] if pattern.startswith("^") else rf"(?:.*\.)?(?:{pattern})"
    if re.fullmatch(body, module):
      return value
  return default


def _network_config(metadata: Mapping[str, Any], network: str) -> dict:
  """The LoraConfig entries of one network in diffusers' metadata ("unet.lora_alpha": 8, ...)."""
  own = {k.split(".", 1)[1]: v for k, v in metadata.items() if k.startswith(network + ".")}
  if network == "unet":  # metadata saved by a bare model (save_lora_adapter) has no prefix
    own = {**{k: v for k, v in metadata.items() if "." not in k}, **own}
  return own


def _shape(shape) -> str:
  return str(tuple(int(d) for d in shape))


def _factors(where: str, down: np.ndarray, up: np.ndarray, kernel_shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
  """PyTorch-layout lora_down / lora_up -> flax-layout (down (fan_in, r), up (r, features)), checked."""
  r = down.shape[0] if down.ndim else 0
  if up.ndim == 4 and up.shape[2:] == (1, 1):
    up = up.reshape(up.shape[:2])
  if up.ndim != 2 or up.shape[1] != r:
    raise ValueError(f"{where}: lora_down has shape {_shape(down.shape)} (rank {r}) but lora_up has shape "
                     f"{_shape(up.shape)}; lora_up should be (features, {r}): both factors must have the same rank.")
  if len(kernel_shape) == 2:
    fan_in, features = kernel_shape
    torch_shape, want = (features, fan_in), [(r, fan_in)]
  else:
    kh, kw, fan_in, features = kernel_shape
    torch_shape, want = (features, fan_in, kh, kw), [(r, fan_in, kh, kw)]
    if kh == kw == 1:
      want.append((r, fan_in))  # a linear LoRA on a 1x1 convolution
  if tuple(down.shape) not in want:
    raise ValueError(
        f"{where}: lora_down has shape {_shape(down.shape)} but the layer's weight is {_shape(torch_shape)} "
        f"(PyTorch layout), so lora_down should be {_shape(want[0])}: is the adapter for another model?")
  if up.shape[0] != features:
    raise ValueError(f"{where}: lora_up has shape {_shape(up.shape)} but the layer's weight is {_shape(torch_shape)} "
                     f"(PyTorch layout), so lora_up should be ({features}, {r}): is the adapter for another model?")
  if down.ndim == 4:
    down = np.transpose(down, (2, 3, 1, 0)).reshape(-1, r)  # (r, in, kh, kw) -> (kh * kw * in, r), flax order
  else:
    down = down.reshape(r, -1).T
  return np.ascontiguousarray(down, np.float32), np.ascontiguousarray(up.T, np.float32)


def from_state_dict(state_dict: Mapping[str, Any], params: Mapping[str, Any], metadata: Mapping[str, Any] | None = None,
                    strict: bool = True) -> Adapter:
  """Maps a LoRA state dict (any format above) onto `params` (network name -> parameter tree).

  Args:
    state_dict: key -> array, as in the file.
    params: the model's parameter trees (arrays or ShapeDtypeStructs) by network name ("unet", "text_encoder",
      "text_encoder_2": the ones the model has); only the shapes of their kernels, norms and biases are read.
    metadata: diffusers' adapter metadata ("unet.lora_alpha", "unet.alpha_pattern", ...), if any.
    strict: a key that maps to no layer (or to a network the model lacks, e.g. `lora_te1_` for an SDXL
      refiner) is an error naming it; with strict=False such keys are left out and listed in
      `Adapter.ignored`. Shape and rank mismatches are errors either way.

  Raises:
    ValueError: naming the keys that map to nothing, a layer whose factors disagree in rank or do not
      fit the layer (both shapes), or a layer given twice.
  """
  metadata = dict(metadata or {})
  tables = {n: weight_modules(params[n]) for n in NETWORKS if params.get(n) is not None}
  biases = {
      n: {
          p[:-1]: tuple(v.shape) for p, v in traverse_util.flatten_dict(params[n]).items() if p[-1] == "bias"
      } for n in tables
  }
  kohya = {n: {"kohya:" + k: t[name] for k, name in lora_names.kohya_names(n, t).items()} for n, t in tables.items()}
  for n in ("text_encoder", "text_encoder_2"):  # transformers 5 names a bare CLIPTextModel's keys without `text_model.`
    if n in tables:
      tables[n].update({k.removeprefix("text_model."): v for k, v in tables[n].items() if k.startswith("text_model.")})
  groups: dict[tuple[str, Path], dict[str, Any]] = collections.defaultdict(dict)
  keys: dict[tuple[str, Path], list[str]] = collections.defaultdict(list)
  shapes: dict[tuple[str, Path], tuple[int, ...]] = {}
  unmapped, absent = [], collections.defaultdict(list)  # absent: network -> keys for a network the model lacks
  for key in state_dict:
    parsed = _parse_key(key)
    where = None
    if parsed is not None:
      network, module, role = parsed
      if network and network not in tables:
        absent[network].append(key)
        continue
      candidates = [network] if network else ["unet", "text_encoder"]  # no prefix: diffusers' old U-Net files
      for n in candidates:
        found = (kohya if module.startswith("kohya:") else tables).get(n, {}).get(module)
        if found and found[0][-1] != "kernel" and role not in lora_lycoris.WHOLE + ("alpha",):
          found = None  # only LyCORIS full and norm updates adapt a norm layer
        if found:
          where, shapes[(n, found[0])] = (n, found[0]), found[1]
          break
    if where is None:
      unmapped.append(key)
      continue
    if role in groups[where]:
      raise ValueError(f"{key} and {keys[where][0]}: one layer given twice in this file; keep one spelling.")
    groups[where][role] = state_dict[key]
    keys[where].append(key)
  for w, g in groups.items():
    if lora_lycoris.mixed(g):
      name = _name(next(k for k in keys[w] if not k.endswith(".alpha")))
      raise ValueError(f"{name}: {lora_lycoris.mixed(g)} for one layer.")
  incomplete = [
      w for w, g in groups.items()
      if (lora_lycoris.missing(g) if lora_lycoris.kind(g) else "down" not in g or "up" not in g)
  ]
  # Keys of another adapter kind change how their layers' LoRA factors apply (DoRA's magnitudes, a bias):
  # ignoring them (strict=False) would load those layers wrong, so they are refused whatever `strict` says.
  other = sorted({kind for k in unmapped for pat, kind in _OTHER_KINDS if re.search(pat, k)})
  if other:
    raise ValueError(f"{', '.join(other)} adapters are not supported, only plain LoRA (keys such as "
                     f"{_listed([k for k in unmapped if any(re.search(p, k) for p, _ in _OTHER_KINDS)])}).")
  if strict and absent:
    network, missing = next(iter(absent.items()))
    refiner = " (an SDXL refiner has text_encoder_2 only)" if network == "text_encoder" else ""
    raise ValueError(
        f"this LoRA adapts {network}, which this model does not have{refiner}: {_listed(missing)}; "
        "pass strict=False (--lora-ignore-unmatched on the command line) to load the rest and ignore them.")
  if strict and (unmapped or incomplete):
    raise ValueError(_unmapped_message(unmapped, [keys[w][0] for w in incomplete]))
  unmapped += [k for v in absent.values() for k in v]
  layers: dict[str, dict[Path, Factors]] = {}
  for (network, path), g in groups.items():
    if (network, path) in incomplete:
      continue
    module = weights.path_to_torch_key(path).removesuffix(".weight")
    name = _name(next(k for k in keys[(network, path)] if not k.endswith(".alpha")))
    alpha = float(np.asarray(g["alpha"], np.float64).reshape(-1)[0]) if "alpha" in g else None
    lycoris = lora_lycoris.kind(g)
    if lycoris in ("full", "norm"):  # whole updates of the weight and the bias, scale 1 (lora_lycoris.whole)
      shape = shapes[(network, path)]
      delta, bias = lora_lycoris.whole(name, g, shape, path[-1] == "kernel", biases[network].get(path[:-1]))
      layers.setdefault(network, {})[path] = Factors(delta, None, 1.0, shape)
      if bias is not None:
        layers[network][path[:-1] + ("bias",)] = Factors(bias, None, 1.0, bias.shape)
      continue
    if lycoris:
      down, rank = lora_lycoris.update(name, g, shapes[(network, path)])
      up, scale = None, lora_lycoris.scale(alpha, rank)
    else:
      down, up = _factors(name, np.asarray(g["down"]), np.asarray(g["up"]), shapes[(network, path)])
      rank = down.shape[1]
      config = _network_config(metadata, network)
      if alpha is None:
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank)))
      scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    magnitude, kohya = None, any(k.endswith(".dora_scale") for k in keys[(network, path)])
    if "magnitude" in g:
      magnitude = lora_dora.magnitude(name, g["magnitude"], shapes[(network, path)], kohya)
    elif not lycoris and config.get("use_dora"):
      raise ValueError(f"{name}: the {network} adapter is DoRA (use_dora in its metadata) but this layer has no "
                       "lora_magnitude_vector.")
    layers.setdefault(network, {})[path] = Factors(down, up, scale, shapes[(network, path)], magnitude, blend=kohya and
                                                   magnitude is not None)
  if not layers:
    raise ValueError(_unmapped_message(unmapped, [keys[w][0] for w in incomplete], nothing=True))
  return Adapter(layers, tuple(sorted(unmapped + [k for w in incomplete for k in keys[w]])))


def _name(key: str) -> str:
  """The layer's name in the file: the key without its LoRA suffix."""
  if key.rsplit(".", 1)[-1] in lora_lycoris.ROLES:
    return key.rsplit(".", 1)[0]
  for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight", ".lora.down.weight",
                 ".lora.up.weight", ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight", ".dora_scale",
                 ".lora_magnitude_vector", ".lora_magnitude_vector.weight", ".lora_mid.weight"):
    if key.endswith(suffix):
      return key.removesuffix(suffix)
  return key


def _listed(keys: Sequence[str]) -> str:
  return ", ".join(sorted(keys)[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")


def _unmapped_message(unmapped: Sequence[str], incomplete: Sequence[str], nothing: bool = False) -> str:
  parts = []
  if nothing:
    parts.append("no key of this LoRA maps to a layer of this model")
  if unmapped:
    parts.append(f"LoRA keys that map to no layer of this model: {_listed(unmapped)}")
  if incomplete:
    parts.append(f"layers with only one of lora_down/lora_up, or lacking LyCORIS factors (hada_*, lokr_*, diff, "
                 "w_norm/b_norm): "
                 f"{', '.join(sorted(incomplete)[:6])}")
  hint = " (is it an adapter for another model: SD 1.x, SD 2.x or SDXL?)"
  return "; ".join(parts) + hint + (
      "." if nothing else
      "; pass strict=False (--lora-ignore-unmatched on the command line) to load the rest and ignore them.")


def load(source, params: Mapping[str, Any], strict: bool = True) -> Adapter:
  """`read` then `from_state_dict`: a LoRA file, folder or state dict mapped onto `params`."""
  state_dict, metadata = read(source)
  try:
    return from_state_dict(state_dict, params, metadata, strict)
  except ValueError as e:
    if isinstance(source, Mapping):
      raise
    raise ValueError(f"{os.fspath(source)}: {e}") from None
