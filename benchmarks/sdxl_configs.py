"""SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0) as its config.json files publish it, for the
benchmarks (nothing can be downloaded here), with the published parameter counts they must reproduce.
Standard library only, as sd15_configs (imported from the benchmarks/ folder on sys.path)."""

import sd15_configs

SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

# The VAE and the first text encoder are SD 1.5's architectures (CLIP ViT-L/14's text tower); the second is
# OpenCLIP ViT-bigG/14's text tower with its projection.
SDXL_VAE = dict(sd15_configs.SD15_VAE, force_upcast=True, sample_size=1024, scaling_factor=0.13025)

SDXL_TEXT_ENCODER = dict(sd15_configs.SD15_TEXT_ENCODER)

SDXL_TEXT_ENCODER_2 = dict(sd15_configs.SD15_TEXT_ENCODER, architectures=["CLIPTextModelWithProjection"],
                           hidden_act="gelu", hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                           num_hidden_layers=32, projection_dim=1280)

# The parameter counts of the published weights (diffusers / transformers `num_parameters()`).
PUBLISHED_PARAMETERS = {"unet": 2_567_463_684, "vae": 83_653_863, "te": 123_060_480, "te2": 694_659_840}
