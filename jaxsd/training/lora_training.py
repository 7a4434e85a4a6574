"""LoRA training (Hu et al. 2021): the U-Net stage with only low-rank adapters trained, the base U-Net frozen.

The trained pytree is the adapter alone: for every target layer, `{"down": (fan_in, r), "up": (r, features)}`
under the layer's path in the U-Net's parameter tree (flax layout, as `jaxsd.lora.Factors`). The base
U-Net's parameters travel in `frozen`, so they are neither differentiated nor in the optimizer state.

The loss merges `W + (alpha / r) * down @ up` into each target kernel inside the jitted step
(`jaxsd.lora_merge.merge_kernel`, fp32) and runs the U-Net stage's loss on the merged parameters. Merging rather
than a LoRA branch on the activations keeps the networks as they are (no LoRA-aware Dense or Conv in
jaxsd.models) and runs the U-Net program of full fine-tuning; its extra cost, r * (fan_in + features) per
layer plus one kernel-sized add, does not grow with batch or resolution. Autodiff forms each target
kernel's gradient and projects it onto the factors; the frozen layers' weight gradients are never
computed. What merging cannot express is LoRA dropout (PEFT drops each token's input to `down`, a
per-token change of the kernel), so `lora.dropout` must be 0.

With `lora.train_text_encoder` the text encoder's attention projections get adapters too (as diffusers'
train_dreambooth_lora.py --train_text_encoder: q_proj, k_proj, v_proj, out_proj, the same rank, alpha and init):
the trained pytree is then {"unet": ..., "text_encoder": ...} and the captions' encodings carry gradients.
For SDXL both text encoders get them (as diffusers' train_text_to_image_lora_sdxl.py --train_text_encoder), the
second's under "text_encoder_2".

With `lora.token_embeddings` (textual inversion, Gal et al. 2022; with adapters, the "pivotal tuning" of
kohya's sd-scripts) the rows of the text encoder's token-embedding table for those words are trained too, under
"token_embeddings" ({word: (hidden,)}), initialised from their own rows or from `lora.token_init`'s (diffusers'
--initializer_token); the rest of the table stays frozen. With `target_modules=""` only the embeddings train.
They are written as diffusers' `learned_embeds.safetensors` (`jaxsd.token_embeddings`).

With `lora.use_dora` (DoRA, Liu et al. 2024; diffusers' scripts' --use_dora, PEFT's `LoraConfig(use_dora=True)`)
every adapted layer, the text encoders' too, also trains a magnitude vector, `{"down", "up", "magnitude": (features,)}`,
started as PEFT starts it: the base kernel's norm per output channel (`jaxsd.lora_dora.initial_magnitude`), so that
with `up` zero the first step runs the base model exactly. The merged kernel is DoRA's,
m * (W + s down @ up) / ||W + s down @ up|| per output channel, by the same `merge_kernel` / `jaxsd.lora_dora.rescale`
that applies a loaded PEFT DoRA file, whose norm is a constant to autodiff as in peft's forward
(`weight_norm.detach()`): the gradients of m, down and up are peft's, and those of down and up differ from what
differentiating through the norm would give (see `jaxsd.lora_dora`). The adapter is written with PEFT's
`lora_magnitude_vector` keys and `use_dora` in the adapter metadata, which diffusers' load_lora_weights reads as
DoRA; a kohya file is refused (A1111 applies `dora_scale` per input channel and ComfyUI divides by the base weight's
norm: neither would apply the trained adapter).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxsd import lora
from jaxsd import lora_dora
from jaxsd import lora_export
from jaxsd import lora_merge
from jaxsd import token_embeddings
from jaxsd.training.stages import Stage

INITS = ("gaussian", "kaiming")  # diffusers' train_text_to_image_lora.py; PEFT's default
TEXT_ATTENTION = "q_proj,k_proj,v_proj,out_proj"  # diffusers' train_dreambooth_lora.py text_lora_config


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """What is trained: rank, alpha, the target layers (PyTorch module name -> flax kernel shape) and the init."""
  rank: int
  alpha: float
  targets: dict[tuple[str, ...], tuple[int, ...]]  # kernel path (without "kernel") -> kernel shape
  init: str = "gaussian"
  text_targets: dict[tuple[str, ...], tuple[int, ...]] = dataclasses.field(default_factory=dict)  # text encoder's
  text_targets_2: dict[tuple[str, ...], tuple[int, ...]] = dataclasses.field(default_factory=dict)  # SDXL's second
  tokens: dict[str, int] = dataclasses.field(default_factory=dict)  # words whose token embeddings train -> ids
  dora: bool = False  # DoRA: every adapted layer also trains a magnitude per output channel

  @property
  def structured(self) -> bool:
    """Whether part of the text encoder trains (adapters or token rows): the trained pytree is then {"unet": ...,
    "text_encoder": ..., "token_embeddings": ...} and the captions' encodings carry gradients (else the U-Net's
    factors alone, the text encoder frozen)."""
    return bool(self.text_targets or self.tokens)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def target_layers(unet_params: Any, target_modules: str | tuple[str, ...], network: str = "U-Net",
                  setting: str = "target_modules") -> dict[tuple[str, ...], tuple[int, ...]]:
  """The Dense / Conv layers whose PyTorch module name is a target or ends in `.target` (PEFT's matching);
  `setting` is the config key named in errors."""
  names = [t.strip() for t in target_modules.split(",")] if isinstance(target_modules, str) else list(target_modules)
  names = [t for t in names if t]
  examples = ("q_proj, k_proj, v_proj, out_proj, mlp.fc1"
              if network == "text encoder" else "to_q, to_out.0, ff.net.0.proj, ff.net.2, proj_in, conv1")
  if not names:
    raise ValueError(f"{setting} is empty: name the {network}'s layers to adapt, e.g. {examples}.")
  found, used = {}, set()
  for module, (path, shape) in lora.kernel_modules(unet_params).items():
    for t in names:
      if module == t or module.endswith("." + t):
        found[path[:-1]] = shape
        used.add(t)
  unused = [t for t in names if t not in used]
  if unused:
    raise ValueError(f"{setting} {', '.join(unused)} match no Dense or Conv layer of the {network} (module "
                     f"names as in its PyTorch state dict, e.g. {examples}).")
  return found


def check_settings(c) -> None:
  """ValueError for values of the config section `lora` that cannot work (checked before any model is loaded)."""
  if int(c.rank) < 1:
    raise ValueError(f"rank={c.rank}: the adapter rank must be >= 1.")
  if not 0 <= float(c.alpha) < math.inf:
    raise ValueError(f"alpha={c.alpha}: the adapter's alpha must be a finite number >= 0 (its scale is alpha / rank; "
                     "0 means alpha = rank, diffusers' scripts' default).")
  if float(c.dropout) != 0:
    raise ValueError(f"dropout={c.dropout}: only 0 is supported (the adapter is merged into the kernels, and "
                     "PEFT's dropout acts on each token's input to lora_A, which a merged kernel cannot express).")
  if c.init not in INITS:
    raise ValueError(f"init={c.init!r}: choose one of {', '.join(INITS)}.")
  if c.get("token_init") and not c.get("token_embeddings"):
    raise ValueError(f"token_init={c.token_init!r} starts token embeddings, but token_embeddings names none: set "
                     "token_embeddings (e.g. 'sks') or leave token_init empty.")
  if c.get("text_target_modules", TEXT_ATTENTION) != TEXT_ATTENTION and not c.get("train_text_encoder"):
    raise ValueError(f"text_target_modules={c.text_target_modules!r} names the text encoder's layers to adapt, but "
                     "train_text_encoder is False: set train_text_encoder=True, or leave text_target_modules as it is.")
  if not c.target_modules and not c.get("token_embeddings"):
    raise ValueError("target_modules is empty and token_embeddings names no word: nothing would train.")
  if c.export_format not in lora_export.FORMATS:
    raise ValueError(f"export_format={c.export_format!r}: choose one of {', '.join(lora_export.FORMATS)}.")
  if c.get("use_dora") and c.export_format == "kohya":
    raise ValueError("use_dora=True with export_format='kohya': kohya files' dora_scale is applied per input channel "
                     "(A1111) or against the base weight's norm (ComfyUI), not as the DoRA trained here; use "
                     "export_format='peft' (diffusers' load_lora_weights and jaxsd load it).")
  if c.get("use_dora") and not c.target_modules and not c.get("train_text_encoder"):
    raise ValueError("use_dora=True adds a magnitude to every adapted layer, but target_modules is empty and "
                     "train_text_encoder is False (token embeddings only): set use_dora=False or name layers to adapt.")


def make_spec(unet_params: Any, c, text_params: Any = None, text_params_2: Any = None, tokenizer=None) -> LoraSpec:
  """A LoraSpec from the config section `lora` (rank, alpha, target_modules, dropout, init, train_text_encoder,
  text_target_modules, token_embeddings, use_dora); `text_params_2`: SDXL's second text encoder, adapted too;
  `tokenizer` reads the words of token_embeddings; ValueError for bad values."""
  check_settings(c)
  tokens = {}
  if c.get("token_embeddings"):
    if text_params_2 is not None:
      raise ValueError("token_embeddings: not implemented for SDXL (two text encoders, two tables); leave it empty.")
    tokens = token_embeddings.token_ids(tokenizer, c.token_embeddings)
    if c.get("token_init"):
      token_embeddings.token_ids(tokenizer, c.token_init)  # one token too
  alpha = float(c.alpha) if c.alpha else float(c.rank)  # 0: alpha = rank, scale 1 (diffusers' script)
  text_targets, text_targets_2 = {}, {}
  if c.get("train_text_encoder"):
    modules = c.get("text_target_modules", TEXT_ATTENTION)
    text_targets = target_layers(text_params, modules, "text encoder", "text_target_modules")
    if text_params_2 is not None:
      text_targets_2 = target_layers(text_params_2, modules, "text encoder", "text_target_modules")
  targets = target_layers(unet_params, c.target_modules) if (c.target_modules or not tokens) else {}
  return LoraSpec(int(c.rank), alpha, targets, c.init, text_targets, text_targets_2, tokens, bool(c.get("use_dora")))


def init_adapter(spec: LoraSpec, rng: jax.Array, token_rows: dict | None = None,
                 magnitudes: dict | None = None) -> dict:
  """Fresh factors as PEFT initialises them: `up` (lora_B) zero, so training starts at the base model, and
  `down` (lora_A) N(0, 1/r^2) for "gaussian" or kaiming-uniform(a=sqrt(5)), U(+-1/sqrt(fan_in)), for "kaiming";
  with DoRA each layer's `magnitude` from `magnitudes` (`initial_magnitudes`). The U-Net's factors, or
  {"unet": ..., "text_encoder": ..., "token_embeddings": `token_rows`} when the text encoder has targets or
  embeddings train."""
  if spec.dora and magnitudes is None:
    raise ValueError("a DoRA adapter starts from the base kernels' norms: pass magnitudes=initial_magnitudes(...).")
  mags = magnitudes or {}
  unet = _init_factors(spec, spec.targets, rng, mags.get("unet"))
  if not spec.structured:
    return unet
  out = {"unet": unet} if spec.targets else {}
  if spec.text_targets:
    out["text_encoder"] = _init_factors(spec, spec.text_targets, jax.random.fold_in(rng, 1 << 20),
                                        mags.get("text_encoder"))
  if spec.text_targets_2:
    out["text_encoder_2"] = _init_factors(spec, spec.text_targets_2, jax.random.fold_in(rng, 2 << 20),
                                          mags.get("text_encoder_2"))
  if spec.tokens:
    out["token_embeddings"] = {w: jnp.asarray(token_rows[w], jnp.float32) for w in spec.tokens}
  return out


def initial_token_rows(spec: LoraSpec, text_params: Any, tokenizer, token_init: str = "") -> dict:
  """The rows the trained embeddings start from: each word's own, or `token_init`'s (one word) for all."""
  emb = np.asarray(token_embeddings.table(text_params), np.float32)
  if token_init:
    row = emb[token_embeddings.token_ids(tokenizer, token_init)[token_init.strip()]]
    return {w: row.copy() for w in spec.tokens}
  return {w: emb[i].copy() for w, i in spec.tokens.items()}


def initial_magnitudes(spec: LoraSpec, params: dict) -> dict:
  """DoRA's starting magnitudes, {network: {layer path: (features,)}}: each target kernel's norm per output channel
  (`jaxsd.lora_dora.initial_magnitude`, peft's init) in `params` ({"unet": ..., "text_encoder": ...,
  "text_encoder_2": ...}, the base parameter trees), as numpy: computed once, outside the jitted init, which holds
  them as constants (a few KB)."""
  out = {}
  networks = {"unet": spec.targets, "text_encoder": spec.text_targets, "text_encoder_2": spec.text_targets_2}
  for network, targets in networks.items():
    if targets:
      flat = traverse_util.flatten_dict(params[network])
      out[network] = {path: np.asarray(lora_dora.initial_magnitude(flat[path + ("kernel",)])) for path in targets}
  return out


def _init_factors(spec: LoraSpec, targets: dict, rng: jax.Array, magnitudes: dict | None = None) -> dict:
  flat = {}
  for i, (path, shape) in enumerate(sorted(targets.items())):
    fan_in, features = math.prod(shape[:-1]), shape[-1]
    key = jax.random.fold_in(rng, i)
    if spec.init == "gaussian":
      down = jax.random.normal(key, (fan_in, spec.rank), jnp.float32) / spec.rank
    else:
      bound = 1.0 / math.sqrt(fan_in)
      down = jax.random.uniform(key, (fan_in, spec.rank), jnp.float32, -bound, bound)
    flat[path + ("down",)] = down
    flat[path + ("up",)] = jnp.zeros((spec.rank, features), jnp.float32)
    if spec.dora:
      flat[path + ("magnitude",)] = jnp.asarray(magnitudes[path], jnp.float32)
  return traverse_util.unflatten_dict(flat)


def apply_adapter(unet_params: Any, adapter: Any, scale: float) -> Any:
  """`unet_params` with `scale * down @ up` merged into every adapted kernel, DoRA's rescaled merge where a layer has
  a `magnitude` (differentiable in `adapter`; `jaxsd.lora_merge.merge_kernel`)."""
  flat = traverse_util.flatten_dict(unet_params)
  factors = traverse_util.flatten_dict(adapter)
  for path in sorted({p[:-1] for p in factors}):
    k = path + ("kernel",)
    update = (factors[path + ("down",)], factors[path + ("up",)], scale)
    if path + ("magnitude",) in factors:
      update += (factors[path + ("magnitude",)].reshape(lora_dora.output_shape(flat[k].shape)),)
    flat[k] = lora_merge.merge_kernel(flat[k], [update])
  return traverse_util.unflatten_dict(flat)


def lora_stage(base: Stage, unet_params: Any, spec: LoraSpec, token_rows: dict | None = None) -> Stage:
  """The U-Net stage `base` (frozen text encoder) turned into adapter training on `unet_params`; with
  text-encoder targets or token embeddings, `base` must let gradients through the captions' encodings
  (unet_stage's text_gradient). `token_rows`: the embeddings' starting rows (`initial_token_rows`)."""
  if "vae" not in (base.frozen or {}) or "text" not in base.frozen:
    raise ValueError("LoRA training takes the U-Net stage with a frozen text encoder (train_text_encoder=False).")
  magnitudes = None
  if spec.dora:
    text = base.frozen["text"] if spec.text_targets_2 else {"text_encoder": base.frozen["text"]}
    magnitudes = initial_magnitudes(spec, dict(text, unet=unet_params))

  def loss_fn(adapter, batch, rng, frozen):
    if not spec.structured:
      return base.loss_fn(apply_adapter(frozen["unet"], adapter, spec.scale), batch, rng, frozen)
    if spec.text_targets_2:  # SDXL: frozen["text"] holds both encoders' parameters
      text = {n: apply_adapter(frozen["text"][n], adapter[n], spec.scale) for n in ("text_encoder", "text_encoder_2")}
    else:
      text = frozen["text"]
      if spec.text_targets:
        text = apply_adapter(text, adapter["text_encoder"], spec.scale)
      if spec.tokens:
        text = token_embeddings.set_rows(text, spec.tokens, adapter["token_embeddings"])
    unet = apply_adapter(frozen["unet"], adapter["unet"], spec.scale) if spec.targets else frozen["unet"]
    return base.loss_fn(unet, batch, rng, dict(frozen, text=text))

  return Stage("lora", lambda rng: init_adapter(spec, rng, token_rows, magnitudes), loss_fn,
               frozen=dict(base.frozen, unet=unet_params), modules=dict(base.modules))


def to_adapter(spec: LoraSpec, adapter: Any) -> lora.Adapter:
  """The trained factors as a `jaxsd.lora.Adapter` of the U-Net, and of the text encoder when it has targets
  (for `lora_export.save` and `pipe.load_lora`)."""
  adapter = jax.device_get(adapter)
  if not spec.structured:
    return lora.Adapter({"unet": _layers(spec, spec.targets, adapter)})
  layers = {}
  if spec.targets:
    layers["unet"] = _layers(spec, spec.targets, adapter["unet"])
  if spec.text_targets:
    layers["text_encoder"] = _layers(spec, spec.text_targets, adapter["text_encoder"])
  if spec.text_targets_2:
    layers["text_encoder_2"] = _layers(spec, spec.text_targets_2, adapter["text_encoder_2"])
  return lora.Adapter(layers)


def _layers(spec: LoraSpec, targets: dict, factors: Any) -> dict:
  flat = traverse_util.flatten_dict(factors)
  out = {}
  for path, shape in targets.items():
    m = flat.get(path + ("magnitude",))
    out[path + ("kernel",)] = lora.Factors(np.asarray(flat[path + ("down",)]), np.asarray(flat[path + ("up",)]),
                                           spec.scale, shape,
                                           None if m is None else lora_dora.magnitude("/".join(path), m, shape, False))
  return out


def describe(spec: LoraSpec) -> dict:
  """JSON-able facts about the adapter (for result.json)."""
  count = lambda targets: sum(spec.rank * (math.prod(s[:-1]) + s[-1]) + spec.dora * s[-1]  # noqa: E731
                              for s in targets.values())
  facts = dict(rank=spec.rank, alpha=spec.alpha, scale=spec.scale, layers=len(spec.targets),
               adapter_parameters=count(spec.targets) + count(spec.text_targets) + count(spec.text_targets_2))
  if spec.dora:
    facts.update(dora=True)
  if spec.tokens:
    facts.update(token_embeddings=sorted(spec.tokens))
  if spec.text_targets:
    facts.update(text_encoder_layers=len(spec.text_targets), text_encoder_parameters=count(spec.text_targets))
  if spec.text_targets_2:
    facts.update(text_encoder_2_layers=len(spec.text_targets_2), text_encoder_2_parameters=count(spec.text_targets_2))
  return facts
