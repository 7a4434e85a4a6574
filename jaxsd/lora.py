"""LoRA adapters made elsewhere, as low-rank updates of jaxsd's U-Net and text-encoder parameters.

Reads the formats in circulation and maps every key onto a Dense or Conv kernel of the parameter
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
them. Still refused, by name: LyCORIS' full (`diff`) and norm (`w_norm`) layers, OFT, (IA)^3, a lora_B bias.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxsd.config import finite32
from jaxsd import block_scales, hub, lora_dora, lora_lycoris, lora_names, model_folder, token_embeddings, weights
from jaxsd.files import written_whole

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
    (r"\.diff(_b)?$", "LyCORIS full (diff)"),
    (r"\.[wb]_norm$", "LyCORIS norm"),
    (r"(^|[._])oft_", "OFT"),
    (r"\.on_input$", "(IA)^3"),
)


class Factors(NamedTuple):
  """One layer's update, kernel + scale * (down @ up).reshape(kernel.shape) (DoRA: rescaled, see `jaxsd.lora_dora`);
  with `up` None (LyCORIS LoHa / LoKr, `jaxsd.lora_lycoris`), kernel + scale * down: `down` is the whole update."""
  down: Any  # (fan_in, r): the kernel's input axes (kh, kw, in) flattened in flax order; or ΔW (kernel_shape)
  up: Any  # (r, features); None when `down` is the whole update
  scale: float  # alpha / r (or alpha / sqrt(r) for rsLoRA)
  kernel_shape: tuple[int, ...]  # the flax kernel's: (in, out) for Dense, (kh, kw, in, out) for Conv
  magnitude: Any = None  # DoRA's, fp32, broadcasting against the kernel along the axis it scales; None: plain LoRA
  blend: bool = False  # DoRA from a kohya-style file: its weight blends W and the DoRA weight, as A1111 (lora_dora)


@dataclasses.dataclass(frozen=True)
class Adapter:
  """A LoRA adapter mapped onto a model: network ("unet" / "text_encoder") -> kernel path -> Factors."""
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
      "text_encoder_2": the ones the model has); only their kernels' shapes are read.
    metadata: diffusers' adapter metadata ("unet.lora_alpha", "unet.alpha_pattern", ...), if any.
    strict: a key that maps to no layer (or to a network the model lacks, e.g. `lora_te1_` for an SDXL
      refiner) is an error naming it; with strict=False such keys are left out and listed in
      `Adapter.ignored`. Shape and rank mismatches are errors either way.

  Raises:
    ValueError: naming the keys that map to nothing, a layer whose factors disagree in rank or do not
      fit the layer (both shapes), or a layer given twice.
  """
  metadata = dict(metadata or {})
  tables = {n: kernel_modules(params[n]) for n in NETWORKS if params.get(n) is not None}
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
    parts.append(f"layers with only one of lora_down/lora_up, or lacking LyCORIS factors (hada_*, lokr_*): "
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


# --- writing adapters -------------------------------------------------------------------------

FORMATS = ("peft", "kohya")


def _torch_factors(f: Factors) -> tuple[np.ndarray, np.ndarray]:
  """Flax-layout factors -> PyTorch-layout lora_down (r, in[, kh, kw]) and lora_up (out, r[, 1, 1])."""
  down, up = np.asarray(jax.device_get(f.down), np.float32), np.asarray(jax.device_get(f.up), np.float32)
  r = down.shape[1]
  if len(f.kernel_shape) == 4:
    kh, kw, fan_in, features = f.kernel_shape
    return (np.ascontiguousarray(down.reshape(kh, kw, fan_in,
                                              r).transpose(3, 2, 0,
                                                           1)), np.ascontiguousarray(up.T.reshape(features, r, 1, 1)))
  return np.ascontiguousarray(down.T), np.ascontiguousarray(up.T)


def to_state_dict(adapter: Adapter, fmt: str = "peft", dtype=np.float32,
                  unet_names: Mapping[str, str] | None = None) -> tuple[dict[str, np.ndarray], dict]:
  """(state dict, adapter metadata) in diffusers / PEFT naming (`unet.<module>.lora_A.weight`, alphas in
  the metadata as diffusers' save_lora_weights writes them) or kohya's (`lora_unet_<module>.lora_down.weight`
  with an `.alpha` per layer; `lora_te1_` / `lora_te2_` when the adapter has a second text encoder, as
  sd-scripts' SDXL files). Both load with diffusers' load_lora_weights and back with `load`.

  A DoRA adapter (PEFT's, magnitudes per output channel) is written in PEFT naming only, as diffusers'
  save_lora_weights writes peft's: `<network>.<module>.lora_magnitude_vector` (`...lora_magnitude_vector.weight` for a
  text encoder, which transformers 5 needs), (out,) for a linear layer and (1, out, 1, 1) for a convolution, and
  `<network>.use_dora` in the metadata (every layer of a network DoRA, as one LoraConfig says). Kohya files are
  refused for it: A1111 applies a `dora_scale` per input channel and ComfyUI divides an output-channel one by the
  base weight's norm, so no kohya-world loader would apply peft's DoRA (`jaxsd.lora_dora`).

  `unet_names` (kohya only): U-Net module name -> the name to write instead, e.g. `lora_names.sgm_names(...)`
  of the whole U-Net for sd-scripts' SDXL names (which A1111 expects of an SDXL adapter)."""
  if fmt not in FORMATS:
    raise ValueError(f"format {fmt!r}: choose one of {', '.join(FORMATS)}.")
  dora = {n for n, layers in adapter.layers.items() if any(f.magnitude is not None for f in layers.values())}
  if dora and fmt == "kohya":
    raise ValueError("a DoRA adapter in kohya format: A1111 and ComfyUI apply kohya files' dora_scale otherwise than "
                     "peft's DoRA (lora_dora); write it with format 'peft'.")
  for network in dora:
    layers = adapter.layers[network]
    if any(f.magnitude is None or f.blend or np.shape(f.magnitude) != lora_dora.output_shape(f.kernel_shape)
           for f in layers.values()):
      raise ValueError(f"a {network} adapter mixing DoRA and plain layers, or with kohya-style DoRA (A1111's blend, "
                       "per-input-channel magnitudes): only PEFT's DoRA, on every layer of a network, is written.")
  if any(f.up is None for layers in adapter.layers.values() for f in layers.values()):
    raise ValueError("a LyCORIS LoHa / LoKr adapter: only plain LoRA adapters are written.")
  out, metadata = {}, {}
  prefixes = lora_names.SDXL_PREFIXES if "text_encoder_2" in adapter.layers else lora_names.PREFIXES
  for network, layers in adapter.layers.items():
    ranks, alphas = {}, {}
    for path, f in layers.items():
      module = weights.path_to_torch_key(path).removesuffix(".weight")
      down, up = _torch_factors(f)
      ranks[module], alphas[module] = down.shape[0], f.scale * down.shape[0]
      if fmt == "kohya":
        kohya = (unet_names or {}).get(module, module) if network == "unet" else module
        name = prefixes[network] + kohya.replace(".", "_")
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down.astype(dtype), up.astype(dtype)
        out[f"{name}.alpha"] = np.asarray(alphas[module], np.float32)
      else:
        out[f"{network}.{module}.lora_A.weight"], out[f"{network}.{module}.lora_B.weight"] = (down.astype(dtype),
                                                                                              up.astype(dtype))
        if f.magnitude is not None:  # peft's parameter: (out,) for a Linear, (1, out, 1, 1) for a Conv2d
          m = np.asarray(jax.device_get(f.magnitude), np.float32).reshape(-1)
          # Text encoders' keys end in `.weight`: transformers 5's load_adapter (diffusers' way into them) loads only
          # that spelling and silently keeps peft's initial magnitudes for the other; peft reads both.
          key = f"{network}.{module}.lora_magnitude_vector" + ("" if network == "unet" else ".weight")
          out[key] = m.reshape((1, -1, 1, 1) if up.ndim == 4 else -1).astype(dtype)
    if fmt == "peft":
      # Module names in the config without transformers 4's `text_model.` level: PEFT matches them as suffixes,
      # so they fit transformers 4's CLIPTextModel (which has it, as the state-dict keys do) and 5's (which has not).
      ranks = {m.removeprefix("text_model."): v for m, v in ranks.items()}
      alphas = {m.removeprefix("text_model."): v for m, v in alphas.items()}
      r = collections.Counter(ranks.values()).most_common(1)[0][0]
      alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
      metadata.update({
          f"{network}.r": r,
          f"{network}.lora_alpha": alpha,
          f"{network}.target_modules": sorted(ranks),
          f"{network}.rank_pattern": {
              m: v for m, v in ranks.items() if v != r
          },
          f"{network}.alpha_pattern": {
              m: v for m, v in alphas.items() if v != alpha
          },
      })
      if network in dora:
        metadata[f"{network}.use_dora"] = True
  return out, metadata


def save(adapter: Adapter, path: str, fmt: str = "peft", dtype=np.float32,
         unet_names: Mapping[str, str] | None = None) -> str:
  """Writes `to_state_dict` as safetensors: to `path` if it ends in .safetensors, else to
  `path/pytorch_lora_weights.safetensors` (diffusers' name). Returns the file written."""
  path = os.fspath(path)
  if not path.endswith(".safetensors"):
    os.makedirs(path, exist_ok=True)
    path = os.path.join(path, WEIGHT_NAME)
  state_dict, metadata = to_state_dict(adapter, fmt, dtype, unet_names)
  header = {METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)} if metadata else None
  with written_whole(path) as tmp:
    model_folder.write_safetensors(state_dict, tmp, header)
  return path


# --- applying adapters -------------------------------------------------------------------------


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
