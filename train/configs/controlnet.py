"""Train a ControlNet for a pretrained model (its U-Net, VAE and text encoder frozen).

  python -m train --config train/configs/controlnet.py:shapes --workdir DIR --config.init=SHAPES_WORKDIR/model
The ControlNet starts as diffusers' `ControlNetModel.from_unet` (the U-Net's encoder copied, zero convolutions
at 0) and learns the diffusion loss of the frozen U-Net fed its residuals (diffusers' train_controlnet.py).
Each training image's condition is derived from the image itself (config.controlnet.conditioning):
"shape_mask", the shape's silhouette, for a model trained on the built-in shapes dataset (`shapes` variant,
e.g. the default config's DIR/model). The training settings are the U-Net stage's (config.unet: steps,
batch_size, optimizer, ema_decay, ...). The result is DIR/controlnet, a diffusers ControlNetModel folder:
`pipe.with_controlnet(DIR/controlnet)` here, `ControlNetModel.from_pretrained` in diffusers.
"""

import ml_collections

from train.configs import default


def get_config(variant: str = "shapes"):
  if variant != "shapes":
    raise ValueError(f"controlnet variant {variant!r}: use shapes (conditions derived from the shapes dataset).")
  c = default.get_config()
  c.stages = "unet"
  c.init = ""  # required: the diffusers folder of the model to steer (a shapes workdir's model/)
  c.data.random_flip = True  # the condition is derived from the flipped image: they stay aligned
  u = c.unet
  u.steps = 3000
  u.batch_size = 64
  u.optimizer = default._optimizer(1e-4, 100, schedule="constant", weight_decay=1e-2)  # train_controlnet.py's lr
  u.ema_decay = 0.0  # diffusers' train_controlnet.py keeps no EMA
  u.train_text_encoder = False
  u.timestep_sampling = "uniform"  # train_controlnet.py's draw
  u.timestep_uniform_fraction = 0.0
  u.cache_latents = False  # the condition comes from each (flipped) image
  u.sample_every = 0
  c.controlnet = ml_collections.ConfigDict(
      dict(
          conditioning="shape_mask",
          # () : diffusers' (16, 32, 96, 256) cut to the VAE's downsampling (one stride-2 conv per halving)
          conditioning_embedding_out_channels=(),
      ))
  return c
