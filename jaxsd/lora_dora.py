"""DoRA (weight-decomposed LoRA, Liu et al. 2024): a LoRA whose layers also rescale the updated weight per channel.

A DoRA layer's weight is `m / ||W + s BA|| * (W + s BA)` (PyTorch layout, W (out, in[, kh, kw])): the norm per
output channel over the other axes (peft's `DoraLinearLayer.get_weight_norm`, `_DoraConvNdLayer.get_weight_norm`),
m the trained magnitude vector. It is linear in the input, so jaxsd merges it into the kernel like a plain LoRA.

The magnitudes in circulation:
- PEFT / diffusers: `<module>.lora_magnitude_vector`, (out,) for a Linear and (1, out, 1, 1) for a Conv2d, always
  per output channel;
- kohya-style files (LyCORIS `dora_wd=True`, OneTrainer): `<name>.dora_scale`, (out, 1[, 1, 1]) when trained with
  LyCORIS' `wd_on_output=True` (peft's DoRA) and (1, in[, 1, 1]) otherwise (LyCORIS' default, the DoRA of A1111
  and ComfyUI: the norm per *input* channel, over (out, kh, kw)). A (1, C, 1, 1) shape thus means an output axis in
  a PEFT file and an input axis in a kohya one.

Here a magnitude is kept as an fp32 array that broadcasts against the flax kernel ((1, .., out) or (.., in, 1)): the
norm runs over every axis it broadcasts along.

Several adapters apply in the order they are active, as peft's unfused forward (diffusers' default): each DoRA layer
rescales the output of the layers and adapters before it, with the norm of the *base* weight plus its own update
(`DoraLinearLayer.forward` gets the accumulated result as `base_result`), so the merged kernel is
W_i = f_i * (W_{i-1} + s_i BA_i), f_i = m_i / ||W + s_i BA_i||, and W_i = W_{i-1} + s_i BA_i for a plain LoRA.
peft's merge (diffusers' fuse_lora: `DoraLinearVariant.merge_safe`, the norm of the unmerged base weight, applied
to the weight merged so far) gives the same. An adapter's weight (set_adapters, load_lora's scale) multiplies s
only (peft's `set_scale`): the magnitude stays, so a DoRA adapter at weight 0 still rescales the layer by m / ||W||.

Kohya-style files are the A1111 / ComfyUI world's, and apply as A1111's Lora extension applies them
(`NetworkModule.apply_weight_decompose`, `finalize_updown`): the weight w blends the weight and its full DoRA
weight, W' = W + w (m / ||W + s BA|| * (W + s BA) - W), where W is the layer's weight as the adapters before this
one left it (A1111's `network_apply_weights` hands each adapter the weight modified so far; ComfyUI patches in
order too). The same as peft's at w = 1 for one adapter; at w = 0 the layer is W.

Training (`jaxsd.training.lora_training` with `lora.use_dora`) merges with `rescale` too, so its gradients are
peft's: the norm ||W + s BA|| is a constant to autodiff (`stop_gradient`), as peft's forward detaches it
(`weight_norm.detach()`, DoRA paper section 4.3). That changes the gradient of down and up, not the value: the
gradient of W' = m / ||V|| * V (V = W + s BA) reaches V through the numerator only, m / ||V|| * dL/dW', without
the term that would remove its component along V per channel. m's gradient, (V / ||V||) . dL/dW' per channel, is
the same either way. A fresh adapter's magnitude is `initial_magnitude`, ||W|| per output channel (peft's
`update_layer`, with lora_B zero), so that it starts at the base weight exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _shape(shape) -> str:
  return str(tuple(int(d) for d in shape))


def magnitude(where: str, value, kernel_shape: tuple[int, ...], kohya: bool) -> np.ndarray:
  """A file's magnitude vector (`lora_magnitude_vector`, or `dora_scale` when kohya) as fp32, shaped to broadcast
  against the flax kernel of `kernel_shape` along the axis it scales; ValueError naming the shapes if it fits not."""
  value = np.asarray(value, np.float32)
  fan_in, features = kernel_shape[-2:]
  ones = (1,) * (len(kernel_shape) - 2)
  on_output, on_input = ones + (1, features), ones + (fan_in, 1)
  if kohya and value.ndim >= 2 and all(d == 1 for d in value.shape[2:]):
    if value.shape[:2] == (features, 1):  # LyCORIS wd_on_output=True
      return value.reshape(on_output)
    if value.shape[:2] == (1, fan_in):  # LyCORIS' default: per input channel
      return value.reshape(on_input)
  elif value.size == features and sum(d != 1 for d in value.shape) <= 1:
    return value.reshape(on_output)
  want = f"({features}, 1) or (1, {fan_in})" if kohya else f"({features},)"
  raise ValueError(f"{where}: the DoRA magnitude has shape {_shape(value.shape)} but the layer has {fan_in} inputs and "
                   f"{features} outputs, so it should be {want} (with trailing 1s for a convolution): is the adapter "
                   "for another model?")


def norm(weight: jnp.ndarray, magnitude_shape: tuple[int, ...]) -> jnp.ndarray:
  """||weight|| over every axis a magnitude of `magnitude_shape` broadcasts along (kept as 1s): per output channel
  for a PEFT magnitude (1, .., out), per input channel for LyCORIS' default (.., in, 1).

  The squares are summed pairwise in a fixed order, by elementwise adds (which XLA does not reorder), rather than by
  a reduce, whose order XLA picks per program: so that `initial_magnitude` and the norm inside a training step agree
  bit for bit (see there)."""
  axes = tuple(i for i, d in enumerate(magnitude_shape) if d == 1)
  kept = tuple(i for i in range(weight.ndim) if i not in axes)
  x = jnp.square(weight).transpose(axes + kept)
  x = x.reshape((-1,) + x.shape[len(axes):])
  while x.shape[0] > 1:
    if x.shape[0] % 2:
      x = jnp.concatenate([x, jnp.zeros_like(x[:1])])
    x = x[0::2] + x[1::2]
  return jnp.sqrt(x[0].reshape(tuple(1 if i in axes else d for i, d in enumerate(weight.shape))))


def output_shape(kernel_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of a per-output-channel magnitude against a flax kernel: (1, out) or (1, 1, 1, out)."""
  return (1,) * (len(kernel_shape) - 1) + (kernel_shape[-1],)


@jax.jit
def _output_norms(kernel: jnp.ndarray) -> jnp.ndarray:
  return norm(kernel, output_shape(kernel.shape)).reshape(-1)


def initial_magnitude(kernel) -> jnp.ndarray:
  """A fresh DoRA layer's magnitude as peft initialises it (`DoraLinearLayer.update_layer` with lora_B zero): the
  kernel's norm per output channel, fp32, shaped (out,) (peft's Linear layout; `magnitude` shapes it back).

  Computed by a jitted program, as the training step computes ||W + s BA||: run op by op, XLA would round each square
  before its add, where inside a program LLVM makes them one fused multiply-add. With the pairwise sum of `norm`
  and the true division of `rescale`, m / ||W + 0|| is then 1 exactly and a fresh adapter's first step runs the
  base model bit for bit, as peft's (checked on CPU at XLA's -O0 and -O2; a program that fused otherwise could
  differ in the last bit)."""
  return _output_norms(jnp.asarray(kernel, jnp.float32))


def rescale(base: jnp.ndarray, merged: jnp.ndarray, delta: jnp.ndarray, magnitude: jnp.ndarray) -> jnp.ndarray:
  """A DoRA update of the kernel merged so far: magnitude / ||base + delta|| * (merged + delta), the norm (of the base
  kernel plus this adapter's scaled update `delta`) over every axis `magnitude` broadcasts along. All fp32. The norm
  is no function of the adapter to autodiff (peft's `weight_norm.detach()`: see the module docstring)."""
  # The barrier keeps XLA from rewriting m / sqrt(s) as m * rsqrt(s), which is not exactly 1 where m = sqrt(s).
  n = jax.lax.optimization_barrier(jax.lax.stop_gradient(norm(base + delta, magnitude.shape)))
  return magnitude / n * (merged + delta)
