"""Train LoRA adapters on a real Stable Diffusion U-Net (base U-Net, VAE and text encoder frozen).

  python -m train --config train/configs/lora.py:sd15 --workdir DIR \
      --config.init=path/to/stable-diffusion-v1-5 --config.data.name=my_images --config.data.data_dir=DATA_DIR
The recipe of diffusers' train_text_to_image_lora.py: rank 4, alpha = rank, gaussian init of lora_A (lora_B
zero), the attention projections, AdamW at 1e-4. The training settings are the U-Net stage's (config.unet:
steps, batch_size, optimizer, ema_decay, gradient_checkpointing, min_snr_gamma, ...); the adapter's are
config.lora. The result is DIR/lora/pytorch_lora_weights.safetensors, which diffusers'
`pipe.load_lora_weights(DIR/lora)` and jaxsd's `pipe.load_lora(DIR/lora)` load on the init model.

SDXL (variant sdxl, an SDXL base folder as config.init): the recipe of diffusers'
examples/text_to_image/train_text_to_image_lora_sdxl.py (rank 4 on the attention projections, AdamW at 1e-4
constant, no caption dropout) on the inputs of finetune.py:sdxl (1024 px, random crops recorded in the time
ids). config.lora.train_text_encoder=True adapts both text encoders (the script's --train_text_encoder). The
file loads with diffusers' StableDiffusionXLPipeline.load_lora_weights; its kohya export names the layers as
sd-scripts does for SDXL (`lora_unet_input_blocks_4_1_...`, `lora_te1_...`, `lora_te2_...`).

DreamBooth LoRA, the recipe of diffusers' examples/dreambooth/train_dreambooth_lora.py (variant dreambooth, or
dreambooth_sd21; dreambooth_sdxl is train_dreambooth_lora_sdxl.py's: 1024 px, the time ids of each instance
and class image's size and crop): the config section `dreambooth` of train/configs/finetune.py (instance
folder and prompt, prior preservation with self-drawn class images cached in DIR/class_images), the adapter
as above:

  python -m train --config train/configs/lora.py:dreambooth --workdir DIR --config.init=SD_FOLDER \
      --config.dreambooth.instance_data_dir=dog/ --config.dreambooth.instance_prompt="a photo of sks dog" \
      --config.dreambooth.with_prior_preservation=True --config.dreambooth.class_prompt="a photo of dog"

DoRA (weight-decomposed LoRA, diffusers' scripts' --use_dora): --config.lora.use_dora=True; the file has PEFT's
lora_magnitude_vector keys and loads as DoRA in diffusers and jaxsd (kohya export is refused for it).

Textual inversion and pivotal tuning: --config.lora.token_embeddings=sks (words that are one token each) trains
those words' token embeddings, with the adapters, or alone with --config.lora.target_modules="" (the U-Net and
the rest of the text encoder untouched); DIR/lora/learned_embeds.safetensors holds them in diffusers' format
(`jaxsd.token_embeddings.apply(pipe.text_encoder_params, pipe.tokenizer, token_embeddings.load(file))`; in
diffusers `pipe.load_textual_inversion(file, token="<sks>")`, then prompt with "<sks>"). SD 1.x/2.x only.
"""

import ml_collections

from train.configs import default, finetune

ATTENTION = "to_q,to_k,to_v,to_out.0"  # diffusers' train_text_to_image_lora.py
FEED_FORWARD = "ff.net.0.proj,ff.net.2"
CONV = "conv1,conv2"  # LoCon on the ResNet blocks' 3x3 convolutions
TEXT_ATTENTION = "q_proj,k_proj,v_proj,out_proj"  # CLIP's attention (diffusers' train_dreambooth_lora.py)


def get_config(variant: str = "sd15"):
  c = finetune.get_config(variant)
  u = c.unet
  u.steps = 15000
  u.batch_size = 16
  u.optimizer = default._optimizer(1e-4, 0, schedule="constant", weight_decay=1e-2)
  u.ema_decay = 0.0  # diffusers' LoRA script keeps no EMA; > 0 averages the adapter (exported instead)
  u.min_snr_gamma = 0.0
  u.sample_every = 0  # sample with `python -m sample` and the adapter file; no grids during training
  # sdxl (and dreambooth_sdxl, whose DreamBooth settings follow): train_text_to_image_lora_sdxl.py's README,
  # lr 1e-4 constant, no EMA, no caption dropout.
  if variant.endswith("sdxl"):
    u.steps = 10000
    u.optimizer = default._optimizer(1e-4, 0, schedule="constant", weight_decay=1e-2)
    u.caption_dropout = 0.0
    u.guidance_scale = 5.0
  if variant.startswith("dreambooth"):  # train_dreambooth_lora.py's README: lr 1e-4 constant, 500 steps
    u.steps = 500
    u.batch_size = 4  # the script's default; prior preservation adds as many class examples
    u.optimizer = default._optimizer(1e-4, 0, schedule="constant", weight_decay=1e-2)
  c.lora = ml_collections.ConfigDict(
      dict(
          rank=4,
          alpha=0.0,  # 0: alpha = rank (scale alpha / rank = 1), as diffusers' script
          # PyTorch module names or suffixes at a dot, comma-separated (PEFT's matching): add FEED_FORWARD
          # or CONV above for a larger adapter.
          target_modules=ATTENTION,
          dropout=0.0,  # only 0: the adapter is merged into the kernels (jaxsd/training/lora_training.py)
          init="gaussian",  # lora_A ~ N(0, 1/rank^2) as diffusers' script; "kaiming": PEFT's default
          # DoRA (diffusers' scripts' --use_dora, PEFT's use_dora): each adapted layer also trains a magnitude per
          # output channel (text encoders' too); written with lora_magnitude_vector keys, PEFT format only.
          use_dora=False,
          export_format="peft",  # or "kohya" (lora_unet_... keys, A1111 / ComfyUI)
          # Adapters on the text encoder too (same rank, alpha, init), exported as text_encoder.* / lora_te_* keys:
          # diffusers' --train_text_encoder.
          train_text_encoder=False,
          text_target_modules=TEXT_ATTENTION,
          # Textual inversion (Gal et al. 2022): comma-separated words, one token each, whose rows of the text
          # encoder's token-embedding table train too (with the adapters: kohya's "pivotal tuning"); with
          # target_modules="" they train alone. Written as DIR/lora/learned_embeds.safetensors (diffusers' format).
          token_embeddings="",
          token_init="",  # a word whose row the embeddings start from (diffusers' --initializer_token); "": their own
      ))
  return c
