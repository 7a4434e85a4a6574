"""Fine-tune a real Stable Diffusion U-Net (VAE and text encoder(s) frozen) on your own captioned images.

  python -m train --config train/configs/finetune.py:sd15 --workdir DIR \
      --config.init=path/to/stable-diffusion-v1-5 --config.data.name=my_images --config.data.data_dir=DATA_DIR
The variant (sd15 | sd21 | sdxl) sets the resolution; the prediction type (epsilon / v) comes from the
folder's scheduler config. The result is a diffusers folder in DIR/model.

sdxl follows diffusers' examples/text_to_image/train_text_to_image_sdxl.py: both text encoders frozen, the
prompt embeddings their penultimate hidden states concatenated, the second's pooled projection as
`text_embeds`, and the time ids (original size, crop top-left, target size) of each image, the crop taken
at a random place and recorded. Its U-Net and AdamW state (2.6B parameters: ~42 GB in fp32 with the two
moments) do not fit a 16 GB chip replicated, so the state is sharded over every device (mesh.fsdp=-1).
"""

from train.configs import default


def get_config(variant: str = "sd15"):
  if variant not in ("sd15", "sd21", "sdxl"):
    raise ValueError(f"finetune variant {variant!r}: use sd15, sd21 or sdxl.")
  c = default.get_config()
  c.stages = "unet"
  c.init = ""  # required: --config.init=<diffusers folder>
  c.dtype = "bfloat16"  # fp32 master weights, bf16 compute
  c.checkpoint_every = 1000
  c.data.image_size = {"sd15": 512, "sd21": 768, "sdxl": 1024}[variant]
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
  if variant == "sdxl":
    c.mesh.data, c.mesh.fsdp = 1, -1  # ZeRO-3 over every device; raise data for data parallelism across groups
    c.data.random_crop = True  # SDXL learns from the recorded crop (its time ids) not to draw cropped subjects
    u.steps = 10000
    u.batch_size = 16
    # diffusers' README example for SDXL: lr 1e-6, constant, no warm-up, 20% empty captions.
    u.optimizer = default._optimizer(1e-6, 10000, 0, schedule="constant", weight_decay=1e-2)
    u.caption_dropout = 0.2
    u.ema_decay = 0.0  # an EMA copy is another 10 GB of fp32 (diffusers' --use_ema is off by default)
    u.guidance_scale = 5.0  # SDXL's pipeline default
  return c
