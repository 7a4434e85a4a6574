"""SDXL base at 1024x1024: parameters and model FLOPs of each network, per image, counted by
`jaxsd.flops.model_flops` on abstract weights (nothing is allocated; runs on any machine in ~2 minutes).

  python benchmarks/sdxl_flops.py [--out docs/runs/sdxl_flops.json]

What it answers (issue 11): the FLOPs of one guided sampling step at 1024² (MLPerf Inference's SDXL
setting: 20 Euler steps, guidance 8), and what the latent cache (`unet.cache_latents`) saves in fine-tuning:
the VAE encoder and both text encoders run once per image instead of once per image per epoch. The
configurations are the published stabilityai/stable-diffusion-xl-base-1.0 config.json files (written out
in sdxl_configs.py: nothing can be downloaded); the parameter counts printed are checked against the
published ones, so a wrong config cannot pass unnoticed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sdxl_configs, as the other benchmarks import theirs
import sdxl_configs  # noqa: E402
from jaxsd import pretrained  # noqa: E402
from jaxsd.flops import model_flops  # noqa: E402
from jaxsd.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402
from jaxsd.models.unet import UNet2DConditionConfig, UNet2DConditionModel  # noqa: E402
from jaxsd.models.vae import AutoencoderKL, AutoencoderKLConfig  # noqa: E402

SIZE = 1024
TOKENS = 77


def _count(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def _abstract(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="", help="also write the figures to this JSON file")
  args = parser.parse_args(argv)

  unet = UNet2DConditionModel(UNet2DConditionConfig.from_dict(sdxl_configs.SDXL_UNET))
  vae = AutoencoderKL(AutoencoderKLConfig.from_dict(sdxl_configs.SDXL_VAE))
  te = CLIPTextModel(CLIPTextConfig.from_dict(sdxl_configs.SDXL_TEXT_ENCODER))
  te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(sdxl_configs.SDXL_TEXT_ENCODER_2))
  params = {name: pretrained.abstract_params(m) for name, m in (("unet", unet), ("vae", vae), ("te", te), ("te2", te2))}
  counts = {name: _count(p) for name, p in params.items()}
  for name, want in sdxl_configs.PUBLISHED_PARAMETERS.items():
    if counts[name] != want:
      raise SystemExit(f"{name}: {counts[name]:,} parameters, the published model has {want:,}: the config is wrong.")

  lat = SIZE // vae.config.downsampling_factor
  x1 = _abstract((1, lat, lat, 4))
  t1 = _abstract((1,), jnp.int32)
  ctx1 = _abstract((1, TOKENS, unet.config.cross_attention_dim))
  pooled1 = _abstract((1, te2.config.projection_dim))
  ids1 = _abstract((1, 6))

  def unet_fwd(p, x, t, c, pooled, ids):
    return unet.apply({"params": p}, x, t, c, text_embeds=pooled, time_ids=ids)

  def unet_train(p, x, t, c, pooled, ids):  # the loss and its gradient with respect to every U-Net weight
    return jax.grad(lambda p: jnp.mean(unet_fwd(p, x, t, c, pooled, ids)**2))(p)

  def vae_encode(p, img):
    return vae.apply({"params": p}, img, method=vae.encode).mean

  def vae_decode(p, z):
    return vae.apply({"params": p}, z, method=vae.decode)

  def text(p, p2, ids):
    out, out2 = te.apply({"params": p}, ids), te2.apply({"params": p2}, ids)
    return out.hidden_states[-2], out2.hidden_states[-2], out2.text_embeds

  timed = {}
  for name, fn, fargs in (
      ("unet_forward", unet_fwd, (params["unet"], x1, t1, ctx1, pooled1, ids1)),
      ("unet_train_step", unet_train, (params["unet"], x1, t1, ctx1, pooled1, ids1)),
      ("vae_encode", vae_encode, (params["vae"], _abstract((1, SIZE, SIZE, 3)))),
      ("vae_decode", vae_decode, (params["vae"], x1)),
      ("text_encoders", text, (params["te"], params["te2"], _abstract((1, TOKENS), jnp.int32))),
  ):
    t0 = time.perf_counter()
    timed[name] = model_flops(fn, *fargs)
    print(f"{name}: {timed[name] / 1e9:,.1f} GFLOP per image ({time.perf_counter() - t0:.0f} s to count)", flush=True)

  guided = 2 * timed["unet_forward"]
  encode_once = timed["vae_encode"] + timed["text_encoders"]
  train_uncached = timed["unet_train_step"] + encode_once
  out = {
      "parameters": counts,
      "gflop_per_image": {
          k: v / 1e9 for k, v in timed.items()
      },
      "guided_step_gflop": guided / 1e9,
      "mlperf_sample_tflop": (20 * guided + timed["vae_decode"] + timed["text_encoders"]) / 1e12,
      "cache_saves_per_image_gflop": encode_once / 1e9,
      "cache_saves_fraction_of_train_step": encode_once / train_uncached,
      "train_step_per_image_uncached_gflop": train_uncached / 1e9,
  }
  print(json.dumps(out, indent=2))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == "__main__":
  main()
