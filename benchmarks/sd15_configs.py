"""The model configurations the benchmarks run, as the config.json dicts of a diffusers folder.

`sd15` is Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5, the files as published: U-Net
859.5M parameters, VAE 83.7M, CLIP ViT-L/14 text tower 123.1M), written out here because nothing
can be downloaded. `small` is a small model of the kind jaxsd trains from scratch on one accelerator
(see `SMALL_NOTE`). `tiny` is what `--quick` runs: every code path, in seconds.

Standard library only: the diffusers 0.39 worker imports this module from its own venv.
"""

from __future__ import annotations

import copy

SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SD15_VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SD15_TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,  # pre-#24773 value: pooling takes the highest id (<|endoftext|>)
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "vocab_size": 49408,
}

SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

SMALL_NOTE = (
    "stand-in for jaxsd's built-in default model (train/configs had no default preset when the "
    "suite was written): 3-level U-Net (128, 256, 512), 8x VAE (64, 128, 256, 256), 6-layer 512-wide CLIP, 256x256 images"
)


def _variant(unet: dict, vae: dict, text: dict) -> dict:
  return {
      "unet": {
          **SD15_UNET,
          **unet
      },
      "vae": {
          **SD15_VAE,
          **vae
      },
      "text_encoder": {
          **SD15_TEXT_ENCODER,
          **text
      },
      "scheduler": dict(SD15_SCHEDULER)
  }


MODELS = {
    "sd15":
        _variant({}, {}, {}),
    "small":
        _variant(
            dict(block_out_channels=[128, 256, 512], down_block_types=["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 2, cross_attention_dim=512,
                 attention_head_dim=8, sample_size=32),
            dict(block_out_channels=[64, 128, 256, 256], layers_per_block=1, sample_size=256),
            dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=6,
                 projection_dim=512)),
    "tiny":
        _variant(
            dict(block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1, cross_attention_dim=32,
                 attention_head_dim=4, norm_num_groups=8, sample_size=16),
            dict(block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                 up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=8, sample_size=32),
            dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32)),
}


def model(name: str) -> dict:
  """{"unet", "vae", "text_encoder", "scheduler"} config dicts of a model (a copy)."""
  if name not in MODELS:
    raise ValueError(f"unknown benchmark model {name!r}; known: {sorted(MODELS)}")
  return copy.deepcopy(MODELS[name])


def vae_factor(name: str) -> int:
  """Image pixels per latent pixel."""
  return 2**(len(MODELS[name]["vae"]["block_out_channels"]) - 1)


def image_size(name: str) -> int:
  """The native image size: the U-Net's latent sample_size times the VAE factor."""
  return MODELS[name]["unet"]["sample_size"] * vae_factor(name)
