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
With --config.unet.cache_latents=True --config.data.random_crop=False --config.data.random_flip=False the
VAE's moments, both encoders' outputs and the time ids are computed once per image (DIR/unet/latent_cache):
20% of an uncached step's FLOPs at 1024² (docs/benchmarks.md), at the price of one crop per image.

DreamBooth, the full fine-tune of diffusers' examples/dreambooth/train_dreambooth.py (variant dreambooth, or
dreambooth_sd21 at 768, dreambooth_sdxl at 1024 with SDXL's time ids of each image's size and crop): a
folder of your subject's images (no captions) under one instance prompt, with prior preservation on images
of the class the model draws itself before training (cached in DIR/class_images):

  python -m train --config train/configs/finetune.py:dreambooth --workdir DIR --config.init=SD_FOLDER \
      --config.dreambooth.instance_data_dir=dog/ --config.dreambooth.instance_prompt="a photo of sks dog" \
      --config.dreambooth.with_prior_preservation=True --config.dreambooth.class_prompt="a photo of dog"
config.data.name is not used; config.data.image_size is the resolution.
"""

import ml_collections

from train.configs import default

VARIANTS = ("sd15", "sd21", "sdxl", "dreambooth", "dreambooth_sd21", "dreambooth_sdxl")


def get_config(variant: str = "sd15"):
  if variant not in VARIANTS:
    raise ValueError(f"finetune variant {variant!r}: use one of {', '.join(VARIANTS)}.")
  sd21, xl = variant.endswith("sd21"), variant.endswith("sdxl")
  c = default.get_config()
  c.stages = "unet"
  c.init = ""  # required: --config.init=<diffusers folder>
  c.init_kind = "sdxl" if xl else "sd"  # the recipe's model: an init folder of the other kind is refused
  c.dtype = "bfloat16"  # fp32 master weights, bf16 compute
  c.checkpoint_every = 1000
  c.data.image_size = 1024 if xl else 768 if sd21 else 512
  c.data.random_flip = True
  c.data.name = ""  # required: a prepared TFDS dataset (e.g. from jaxsd.data.prepare_image_folder)
  u = c.unet
  u.steps = 15000
  u.batch_size = 32
  u.optimizer = default._optimizer(1e-5, 500, schedule="constant", weight_decay=1e-2)
  u.ema_decay = 0.9999
  u.gradient_checkpointing = True
  u.train_text_encoder = False  # the pretrained text encoder stays frozen, as in diffusers' train_text_to_image
  u.min_snr_gamma = 5.0
  u.timestep_sampling = "uniform"  # diffusers' scripts' draw (the default's logit-normal is for training from nothing)
  u.timestep_uniform_fraction = 0.0
  u.sample_every = 1000
  u.sampler, u.sample_steps, u.guidance_scale = "dpmpp_2m", 25, 7.5
  if xl:
    c.mesh.data, c.mesh.fsdp = 1, -1  # ZeRO-3 over every device; raise data for data parallelism across groups
    c.data.random_crop = True  # SDXL learns from the recorded crop (its time ids) not to draw cropped subjects
    u.steps = 10000
    u.batch_size = 16
    # diffusers' README example for SDXL: lr 1e-6, constant, no warm-up, 20% empty captions.
    u.optimizer = default._optimizer(1e-6, 0, schedule="constant", weight_decay=1e-2)
    u.caption_dropout = 0.2
    u.ema_decay = 0.0  # an EMA copy is another 10 GB of fp32 (diffusers' --use_ema is off by default)
    u.guidance_scale = 5.0  # SDXL's pipeline default
  if variant.startswith("dreambooth"):
    _dreambooth(c)
  return c


def _dreambooth(c) -> None:
  """train_dreambooth.py's recipe (its README: lr 5e-6 constant, no warmup, 800 steps with prior preservation;
  the script's batch of 4, no EMA, no min-SNR, no caption dropout, random crops, no flips)."""
  c.checkpoint_every = 200
  c.data.random_flip = False
  u = c.unet
  u.steps = 800
  u.batch_size = 4  # instance examples per step; prior preservation adds as many class examples
  u.optimizer = default._optimizer(5e-6, 0, schedule="constant", weight_decay=1e-2)
  u.ema_decay = 0.0
  u.min_snr_gamma = 0.0
  u.caption_dropout = 0.0
  u.sample_every = 0  # the final samples (instance and class prompt) are written after training
  c.dreambooth = dreambooth_section()


def dreambooth_section() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dict(
          instance_data_dir="",  # required: the subject's images, directly in this folder
          instance_prompt="",  # required: with a rare identifier, e.g. "a photo of sks dog"
          with_prior_preservation=False,  # diffusers' default; True trains on class images beside
          class_prompt="",  # with prior preservation: the class without the identifier, "a photo of dog"
          class_data_dir="",  # optional: class images of your own; the model draws the rest
          num_class_images=100,  # diffusers' default; drawn (cached in DIR/class_images) when fewer exist
          prior_loss_weight=1.0,
          # Class images are drawn with config.unet.sampler, sample_steps and guidance_scale, this many at once.
          sample_batch_size=4,
          center_crop=False,  # diffusers' default: random crops of the resized images
      ))
