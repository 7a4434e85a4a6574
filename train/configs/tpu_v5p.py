"""SD 1.5 U-Net fine-tuning at 512² on a Cloud TPU v5p slice, plain data parallelism (the state fits a chip).

  python -m train --config train/configs/tpu_v5p.py:4 --workdir gs://BUCKET/run \
      --config.init=path/to/stable-diffusion-v1-5 --config.data.name=my_images --config.data.data_dir=gs://BUCKET/tfds
The variant is the number of chips (v5p-8 has 4; a v5p-N slice has N/2); run the same command on every
host. Not run on a TPU yet: no TPU is lent to this project (issue 16); the numbers below are arithmetic,
to be checked with `benchmarks/tpu_session.sh`.

Memory per chip (v5p: 95 GiB HBM, 459 TFLOP/s dense bf16), SD 1.5 U-Net 859.5M parameters:
- fp32 master weights 3.44 GB + AdamW moments 6.88 GB + EMA 3.44 GB = 13.75 GB of state, + 3.44 GB of fp32
  gradients: 17.2 GB, replicated on every chip (`mesh.fsdp=1`: no all-gathers in the step, one
  gradient all-reduce).
- Activations at 64x64 latents, bf16, no rematerialisation: ~0.8 GB per image (27.2 GB at batch 16 on an
  H100 with 13.75 GB of state). Batch 64 per chip: 51 GB + 17.2 + ~2 GB of scratch = ~70 GB of 95: fits
  without `gradient_checkpointing`, so the step does 3 forwards' worth of FLOPs, not 4. MLPerf trains
  at 32 per H100 (80 GB); 64 keeps the MXU's matrices larger at the 8x8 level (64 x 64 = 4,096 rows).
- Compute: ~2,360 GFLOP per image per step; at 50% MFU a v5p chip trains ~97 images/s (MaxDiffusion
  reports ~87 per v5p chip for SD 2.x at 512²).
- SDXL (2.6B parameters: 41 GB of state and gradients) fits too but leaves ~50 GB for activations at
  1024²: use `finetune.py:sdxl` (state sharded over the slice) rather than this config.
"""

from train.configs import finetune

BATCH_PER_CHIP = 64


def get_config(chips: str = "4"):
  n = int(chips)
  if n < 1:
    raise ValueError(f"tpu_v5p variant {chips!r}: the number of chips of the slice (4 for a v5p-8).")
  c = finetune.get_config("sd15")
  c.mesh.fsdp = 1
  c.mesh.data = -1
  u = c.unet
  u.batch_size = BATCH_PER_CHIP * n  # global
  u.gradient_checkpointing = False
  u.cache_latents = True
  c.data.random_flip = False
  c.data.random_crop = False
  return c
