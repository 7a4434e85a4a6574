"""LoRA training (Hu et al. 2021): the U-Net stage with only low-rank adapters trained, the base U-Net frozen.

The trained pytree is the adapter alone: for every target layer, `{"down": (fan_in, r), "up": (r, features)}`
under the layer's path in the U-Net's parameter tree (flax layout, as `jaxsd.lora.Factors`). The base
U-Net's parameters travel in `frozen`, so they are neither differentiated nor in the optimizer state.

The loss merges `W + (alpha / r) * down @ up` into each target kernel inside the jitted step
(`jaxsd.lora.merge_kernel`, fp32) and runs the U-Net stage's loss on the merged parameters. Merging rather
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

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def target_layers(unet_params: Any, target_modules: str | tuple[str, ...],
                  network: str = "U-Net") -> dict[tuple[str, ...], tuple[int, ...]]:
  """The Dense / Conv layers whose PyTorch module name is a target or ends in `.target` (PEFT's matching)."""
  names = [t.strip() for t in target_modules.split(",")] if isinstance(target_modules, str) else list(target_modules)
  names = [t for t in names if t]
  if not names:
    raise ValueError("target_modules is empty: name the layers to adapt, e.g. to_q,to_k,to_v,to_out.0.")
  found, used = {}, set()
  for module, (path, shape) in lora.kernel_modules(unet_params).items():
    for t in names:
      if module == t or module.endswith("." + t):
        found[path[:-1]] = shape
        used.add(t)
  unused = [t for t in names if t not in used]
  if unused:
    examples = ("q_proj, k_proj, v_proj, out_proj, mlp.fc1"
                if network == "text encoder" else "to_q, to_out.0, ff.net.0.proj, ff.net.2, proj_in, conv1")
    raise ValueError(f"target_modules {', '.join(unused)} match no Dense or Conv layer of the {network} (module "
                     f"names as in its PyTorch state dict, e.g. {examples}).")
  return found


def check_settings(c) -> None:
  """ValueError for values of the config section `lora` that cannot work (checked before any model is loaded)."""
  if int(c.rank) < 1:
    raise ValueError(f"rank={c.rank}: the adapter rank must be >= 1.")
  if float(c.dropout) != 0:
    raise ValueError(f"dropout={c.dropout}: only 0 is supported (the adapter is merged into the kernels, and "
                     "PEFT's dropout acts on each token's input to lora_A, which a merged kernel cannot express).")
  if c.init not in INITS:
    raise ValueError(f"init={c.init!r}: choose one of {', '.join(INITS)}.")
  if c.export_format not in lora.FORMATS:
    raise ValueError(f"export_format={c.export_format!r}: choose one of {', '.join(lora.FORMATS)}.")


def make_spec(unet_params: Any, c, text_params: Any = None, text_params_2: Any = None) -> LoraSpec:
  """A LoraSpec from the config section `lora` (rank, alpha, target_modules, dropout, init, train_text_encoder,
  text_target_modules); `text_params_2`: SDXL's second text encoder, adapted too; ValueError for bad values."""
  check_settings(c)
  alpha = float(c.alpha) if c.alpha else float(c.rank)  # 0: alpha = rank, scale 1 (diffusers' script)
  text_targets, text_targets_2 = {}, {}
  if c.get("train_text_encoder"):
    modules = c.get("text_target_modules", TEXT_ATTENTION)
    text_targets = target_layers(text_params, modules, "text encoder")
    if text_params_2 is not None:
      text_targets_2 = target_layers(text_params_2, modules, "text encoder")
  return LoraSpec(int(c.rank), alpha, target_layers(unet_params, c.target_modules), c.init, text_targets,
                  text_targets_2)


def init_adapter(spec: LoraSpec, rng: jax.Array) -> dict:
  """Fresh factors as PEFT initialises them: `up` (lora_B) zero, so training starts at the base model, and
  `down` (lora_A) N(0, 1/r^2) for "gaussian" or kaiming-uniform(a=sqrt(5)), U(+-1/sqrt(fan_in)), for "kaiming".
  The U-Net's factors, or {"unet": ..., "text_encoder": ...} with text-encoder targets."""
  unet = _init_factors(spec, spec.targets, rng)
  if not spec.text_targets:
    return unet
  out = {"unet": unet, "text_encoder": _init_factors(spec, spec.text_targets, jax.random.fold_in(rng, 1 << 20))}
  if spec.text_targets_2:
    out["text_encoder_2"] = _init_factors(spec, spec.text_targets_2, jax.random.fold_in(rng, 2 << 20))
  return out


def _init_factors(spec: LoraSpec, targets: dict, rng: jax.Array) -> dict:
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
  return traverse_util.unflatten_dict(flat)


def apply_adapter(unet_params: Any, adapter: Any, scale: float) -> Any:
  """`unet_params` with `scale * down @ up` merged into every adapted kernel (differentiable in `adapter`)."""
  flat = traverse_util.flatten_dict(unet_params)
  factors = traverse_util.flatten_dict(adapter)
  for path in sorted({p[:-1] for p in factors}):
    k = path + ("kernel",)
    flat[k] = lora.merge_kernel(flat[k], [(factors[path + ("down",)], factors[path + ("up",)], scale)])
  return traverse_util.unflatten_dict(flat)


def lora_stage(base: Stage, unet_params: Any, spec: LoraSpec) -> Stage:
  """The U-Net stage `base` (frozen text encoder) turned into adapter training on `unet_params`; with
  text-encoder targets, `base` must let gradients through the captions' encodings (unet_stage's text_gradient)."""
  if "vae" not in (base.frozen or {}) or "text" not in base.frozen:
    raise ValueError("LoRA training takes the U-Net stage with a frozen text encoder (train_text_encoder=False).")

  def loss_fn(adapter, batch, rng, frozen):
    if spec.text_targets_2:  # SDXL: frozen["text"] holds both encoders' parameters
      text = {n: apply_adapter(frozen["text"][n], adapter[n], spec.scale) for n in ("text_encoder", "text_encoder_2")}
      frozen, adapter = dict(frozen, text=text), adapter["unet"]
    elif spec.text_targets:
      frozen = dict(frozen, text=apply_adapter(frozen["text"], adapter["text_encoder"], spec.scale))
      adapter = adapter["unet"]
    return base.loss_fn(apply_adapter(frozen["unet"], adapter, spec.scale), batch, rng, frozen)

  return Stage("lora", lambda rng: init_adapter(spec, rng), loss_fn, frozen=dict(base.frozen, unet=unet_params),
               modules=dict(base.modules))


def to_adapter(spec: LoraSpec, adapter: Any) -> lora.Adapter:
  """The trained factors as a `jaxsd.lora.Adapter` of the U-Net, and of the text encoder when it has targets
  (for `lora.save` and `pipe.load_lora`)."""
  adapter = jax.device_get(adapter)
  if not spec.text_targets:
    return lora.Adapter({"unet": _layers(spec, spec.targets, adapter)})
  layers = {
      "unet": _layers(spec, spec.targets, adapter["unet"]),
      "text_encoder": _layers(spec, spec.text_targets, adapter["text_encoder"])
  }
  if spec.text_targets_2:
    layers["text_encoder_2"] = _layers(spec, spec.text_targets_2, adapter["text_encoder_2"])
  return lora.Adapter(layers)


def _layers(spec: LoraSpec, targets: dict, factors: Any) -> dict:
  flat = traverse_util.flatten_dict(factors)
  return {
      path + ("kernel",):
          lora.Factors(np.asarray(flat[path + ("down",)]), np.asarray(flat[path + ("up",)]), spec.scale, shape)
      for path, shape in targets.items()
  }


def describe(spec: LoraSpec) -> dict:
  """JSON-able facts about the adapter (for result.json)."""
  count = lambda targets: sum(spec.rank * (math.prod(s[:-1]) + s[-1]) for s in targets.values())  # noqa: E731
  facts = dict(rank=spec.rank, alpha=spec.alpha, scale=spec.scale, layers=len(spec.targets),
               adapter_parameters=count(spec.targets) + count(spec.text_targets) + count(spec.text_targets_2))
  if spec.text_targets:
    facts.update(text_encoder_layers=len(spec.text_targets), text_encoder_parameters=count(spec.text_targets))
  if spec.text_targets_2:
    facts.update(text_encoder_2_layers=len(spec.text_targets_2), text_encoder_2_parameters=count(spec.text_targets_2))
  return facts
