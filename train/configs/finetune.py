"""Fine-tune a real Stable Diffusion U-Net (VAE and text encoder frozen) on your own captioned images.

  python -m train --config train/configs/finetune.py:sd15 --workdir DIR \
      --config.init=path/to/stable-diffusion-v1-5 --config.data.name=my_images --config.data.data_dir=DATA_DIR
The variant (sd15 | sd21) sets the resolution; the prediction type (epsilon / v) comes from the
folder's scheduler config. The result is a diffusers folder in DIR/model.
"""

from train.configs import default


def get_config(variant: str = "sd15"):
  if variant not in ("sd15", "sd21"):
    raise ValueError(f"finetune variant {variant!r}: use sd15 or sd21.")
  c = default.get_config()
  c.stages = "unet"
  c.init = ""  # required: --config.init=<diffusers folder>
  c.dtype = "bfloat16"  # fp32 master weights, bf16 compute
  c.checkpoint_every = 1000
  c.data.image_size = 512 if variant == "sd15" else 768
  c.data.random_flip = True
  c.data.name = ""  # required: a prepared TFDS dataset (e.g. from jaxsd.data.prepare_image_folder)
  u = c.unet
  u.steps = 15000
  u.batch_size = 32
  u.optimizer = default._optimizer(1e-5, 15000, 500, schedule="constant", weight_decay=1e-2)
  u.ema_decay = 0.9999
  u.gradient_checkpointing = True
  u.train_text_encoder = False  # the pretrained text encoder stays frozen, as in diffusers' train_text_to_image
  u.min_snr_gamma = 5.0
  u.sample_every = 1000
  u.sampler, u.sample_steps, u.guidance_scale = "dpmpp_2m", 25, 7.5
  return c
