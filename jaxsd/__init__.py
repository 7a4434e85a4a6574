"""jaxsd: Stable Diffusion in JAX/Flax, with weight parity to diffusers / transformers.

    unet, unet_params = jaxsd.load_unet("sd/unet", dtype=jnp.float32)
    pipe = jaxsd.StableDiffusion.from_pretrained("sd", dtype=jnp.bfloat16)
    images = pipe(["a photo of a cat"], steps=25, sampler="dpmpp_2m")
"""

from jaxsd import xla_cpu_flags

xla_cpu_flags.apply()  # before JAX starts a backend: XLA reads XLA_FLAGS once (jaxsd/xla_cpu_flags.py)

from jaxsd.models.clip import (CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModel,
                               CLIPVisionModelWithProjection)
from jaxsd.models.controlnet import ControlNetModel
from jaxsd.models.t2i_adapter import T2IAdapter
from jaxsd.models.unet import UNet2DConditionModel
from jaxsd.models.vae import AutoencoderKL
from jaxsd.pipeline import StableDiffusion
from jaxsd.pipeline_controlnet import StableDiffusionControlNet, StableDiffusionXLControlNet
from jaxsd.pipeline_t2i_adapter import StableDiffusionAdapter, StableDiffusionXLAdapter
from jaxsd.pipeline_xl import StableDiffusionXL
from jaxsd.pretrained import (abstract_params, init_params, load_clip, load_controlnet, load_image_encoder,
                              load_t2i_adapter, load_text_encoder, load_unet, load_vae, save_pretrained)

__version__ = "0.1.0"

__all__ = [
    "AutoencoderKL",
    "CLIPModel",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "ControlNetModel",
    "StableDiffusion",
    "StableDiffusionAdapter",
    "StableDiffusionControlNet",
    "StableDiffusionXL",
    "StableDiffusionXLAdapter",
    "StableDiffusionXLControlNet",
    "T2IAdapter",
    "UNet2DConditionModel",
    "abstract_params",
    "init_params",
    "load_clip",
    "load_controlnet",
    "load_image_encoder",
    "load_t2i_adapter",
    "load_text_encoder",
    "load_unet",
    "load_vae",
    "save_pretrained",
]
