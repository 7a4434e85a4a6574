"""diffusers PyTorch's side of each benchmark, run as a worker process (see protocol.py).

CPU: fp32, `torch.set_num_threads(cores)`, `torch.no_grad()`. GPU: fp16 inference with diffusers'
default attention (PyTorch SDPA); training with fp32 master weights under bf16 autocast, the
mixed-precision recipe of diffusers' train_text_to_image (bf16 needs no loss scaling).
"""

from __future__ import annotations

import os
import time

import protocol

PROMPT = "a photograph of an astronaut riding a horse"


def _device(spec: dict):
  import torch

  if spec.get("gpu"):
    if not torch.cuda.is_available():
      raise RuntimeError("--gpu: torch sees no CUDA device (a CPU build of torch?)")
    return torch.device("cuda")
  torch.set_num_threads(os.cpu_count())
  return torch.device("cpu")


def _dtype(name: str):
  import torch

  return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _inference_dtype(spec: dict):
  """The spec's dtype, except that a bf16 case runs in fp16 on a GPU: how diffusers is used there."""
  import torch

  dtype = _dtype(spec["dtype"])
  return torch.float16 if spec.get("gpu") and dtype == torch.bfloat16 else dtype


def _sync(device) -> None:
  import torch

  if device.type == "cuda":
    torch.cuda.synchronize()


def unet_forward(spec: dict) -> protocol.Case:
  import diffusers
  import torch

  device, dtype = _device(spec), _inference_dtype(spec)
  unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(spec["model"], "unet"), torch_dtype=dtype)
  unet = unet.to(device).eval()
  b, s = spec["batch"], spec["latent"]
  g = torch.Generator().manual_seed(0)
  x = torch.randn((b, unet.config.in_channels, s, s), generator=g).to(device, dtype)
  ctx = torch.randn((b, 77, unet.config.cross_attention_dim), generator=g).to(device, dtype)
  t = torch.full((b,), 500, dtype=torch.long, device=device)

  def run():
    with torch.no_grad():
      t0 = time.perf_counter()
      unet(x, t, ctx).sample
      _sync(device)
      return time.perf_counter() - t0

  return protocol.Case(run, {"torch_dtype": str(dtype)})


def vae_decode(spec: dict) -> protocol.Case:
  import diffusers
  import torch

  device, dtype = _device(spec), _inference_dtype(spec)
  vae = diffusers.AutoencoderKL.from_pretrained(os.path.join(spec["model"], "vae"), torch_dtype=dtype).to(device).eval()
  s = spec["latent"]
  z = torch.randn((spec["batch"], vae.config.latent_channels, s, s), generator=torch.Generator().manual_seed(0))
  z = z.to(device, dtype)

  def run():
    with torch.no_grad():
      t0 = time.perf_counter()
      vae.decode(z).sample
      _sync(device)
      return time.perf_counter() - t0

  return protocol.Case(run, {"torch_dtype": str(dtype)})


def sample(spec: dict) -> protocol.Case:
  import diffusers
  import torch

  device, dtype = _device(spec), _inference_dtype(spec)
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(spec["model"], torch_dtype=dtype, safety_checker=None,
                                                           requires_safety_checker=False)
  schedulers = {
      "ddim": diffusers.DDIMScheduler,
      "pndm": diffusers.PNDMScheduler,
      "euler": diffusers.EulerDiscreteScheduler
  }
  pipe.scheduler = schedulers[spec["sampler"]].from_config(pipe.scheduler.config)
  pipe = pipe.to(device)
  pipe.set_progress_bar_config(disable=True)
  prompts = [PROMPT] * spec["batch"]

  def run():
    t0 = time.perf_counter()
    pipe(prompts, height=spec["height"], width=spec["width"], num_inference_steps=spec["steps"],
         guidance_scale=spec["guidance_scale"], output_type="np", generator=torch.Generator(device).manual_seed(0))
    _sync(device)
    return time.perf_counter() - t0

  return protocol.Case(run, {"images": spec["batch"], "torch_dtype": str(dtype)})


def train(spec: dict) -> protocol.Case:
  """One U-Net step on cached latents: noise-prediction MSE, clip 1.0, AdamW (lr 1e-4, wd 1e-2)."""
  import diffusers
  import torch

  device = _device(spec)
  compute = _dtype(spec["dtype"])
  unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(spec["model"], "unet")).to(device).train()
  sched = diffusers.DDPMScheduler.from_pretrained(spec["model"], subfolder="scheduler")
  opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
  b, s = spec["batch"], spec["latent"]
  g = torch.Generator().manual_seed(1)
  latents = torch.randn((b, unet.config.in_channels, s, s), generator=g).to(device)
  context = torch.randn((b, 77, unet.config.cross_attention_dim), generator=g).to(device)
  autocast = torch.autocast(device.type, dtype=compute, enabled=compute != torch.float32)

  def run():
    t0 = time.perf_counter()
    noise = torch.randn_like(latents)
    t = torch.randint(0, sched.config.num_train_timesteps, (b,), device=device)
    noisy = sched.add_noise(latents, noise, t)
    with autocast:
      pred = unet(noisy, t, context).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    value = loss.item()  # waits for the step, as jaxsd's worker does
    _sync(device)
    return time.perf_counter() - t0, {"loss": value, "grad_norm": float(grad_norm)}

  return protocol.Case(run, {"images": b})


WORKLOADS = {"unet_forward": unet_forward, "vae_decode": vae_decode, "sample": sample, "train": train}


def setup(spec: dict) -> protocol.Case:
  import diffusers
  import torch

  if spec["workload"] not in WORKLOADS:
    raise ValueError(f"no PyTorch version of workload {spec['workload']!r}")
  case = WORKLOADS[spec["workload"]](spec)
  case.info.update({
      "torch": torch.__version__,
      "diffusers": diffusers.__version__,
      "threads": torch.get_num_threads(),
      "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")
  })
  return case


def device_memory():
  import torch

  return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


if __name__ == "__main__":
  protocol.serve(setup, device_memory)
