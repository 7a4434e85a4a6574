"""SD 1.5 U-Net fine-tuning at 512² on a Cloud TPU v5e slice (v5litepod-N), the U-Net state sharded over each host.

  python -m train --config train/configs/tpu_v5e.py:8 --workdir gs://BUCKET/run \
      --config.init=path/to/stable-diffusion-v1-5 --config.data.name=my_images --config.data.data_dir=gs://BUCKET/tfds
The variant is the number of chips (8, 16, 32, ..., 256); run the same command on every host of the slice
(`jax.distributed` is initialised from the TPU environment). Not run on a TPU yet: no TPU is lent to this
project (issue 16); the numbers below are arithmetic, to be checked with `benchmarks/tpu_session.sh`.

Memory per chip (v5e: 16 GiB HBM, 197 TFLOP/s dense bf16), SD 1.5 U-Net 859.5M parameters:
- fp32 master weights 3.44 GB + AdamW moments 6.88 GB + EMA 3.44 GB = 13.75 GB of state, and 3.44 GB of fp32
  gradients during the update: 17.2 GB, more than a chip holds replicated. Sharded over the 8 chips of a host
  (`mesh.fsdp=8`, ZeRO-3; the data axis spans hosts): 2.15 GB per chip, plus the bf16 copy of the weights
  the step gathers (1.72 GB at most, layer by layer in practice).
- Frozen encoders are not on the step's path with `unet.cache_latents` (MLPerf's and MaxDiffusion's setup);
  only the empty caption's encoding for caption dropout (the text encoder, 0.25 GB bf16) stays.
- Activations at 64x64 latents: ~0.8 GB per image in bf16 without rematerialisation (measured on an H100:
  27.2 GB at batch 16 with 13.75 GB of state), ~0.25 GB with `gradient_checkpointing`. 16 GiB - 2.15 -
  1.72 - 0.25 - ~1 GB of XLA scratch leaves ~11 GB: batch 32 per chip with checkpointing (8 GB), or 12
  without (9.6 GB). Checkpointing costs one more forward (~1.33x the FLOPs) and lets the batch reach 32,
  where the MXU is busy; chosen here: 32 per chip, checkpointing on.
- Compute: a train step at 512² is ~2,360 GFLOP per image (37,747 GFLOP at batch 16, docs/benchmarks.md),
  3,140 with checkpointing; at 50% MFU a v5e chip trains ~31 images/s.
"""

from train.configs import finetune

CHIPS_PER_HOST = 8
BATCH_PER_CHIP = 32


def get_config(chips: str = "8"):
  n = int(chips)
  if n < 1 or (n > CHIPS_PER_HOST and n % CHIPS_PER_HOST):
    raise ValueError(f"tpu_v5e variant {chips!r}: the number of chips of the slice (8, 16, ..., 256).")
  c = finetune.get_config("sd15")
  c.mesh.fsdp = min(n, CHIPS_PER_HOST)  # state sharded within a host (fast ICI), replicated across hosts
  c.mesh.data = -1
  u = c.unet
  u.batch_size = BATCH_PER_CHIP * n  # global
  u.gradient_checkpointing = True
  u.cache_latents = True  # the VAE encoder and text encoder run once per image, not every step
  c.data.random_flip = False  # one encoding per image (required by the cache)
  c.data.random_crop = False
  return c
