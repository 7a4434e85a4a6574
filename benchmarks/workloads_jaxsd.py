"""jaxsd's side of each benchmark, run as a worker process (see protocol.py).

Every workload compiles ahead of time (`jit(...).lower(...).compile()`), so compile time is
reported apart from run time; model FLOPs come from `jaxsd.flops.model_flops`.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # jaxsd without install

import protocol

PROMPT = "a photograph of an astronaut riding a horse"


def _configure_jax(spec: dict) -> None:
  import jax

  if spec.get("cache_dir"):  # the compile workload: persistent cache on, nothing too small to keep
    jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def _dtype(name: str):
  import jax.numpy as jnp

  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def compile_timed(fn, *args, **jit_kw):
  """Returns (compiled, {"trace_lower_s", "compile_s", "flops"}); FLOPs by `jaxsd.flops.model_flops`
  (the compiled program's own cost analysis misses cuDNN calls and loop trips)."""
  import jax

  from jaxsd import flops

  t0 = time.perf_counter()
  lowered = jax.jit(fn, **jit_kw).lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return compiled, {"trace_lower_s": t1 - t0, "compile_s": t2 - t1, "flops": flops.model_flops(fn, *args)}


def _device_facts() -> dict:
  import jax

  from jaxsd import flops

  d = jax.devices()[0]
  return {
      "backend": jax.default_backend(),
      "device_kind": d.device_kind,
      "jax": jax.__version__,
      "peak_bf16_flops": flops.peak_flops_per_device(d.device_kind),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),  # as `import jaxsd` left them (jaxsd/xla_cpu_flags.py)
  }


# --- workloads -------------------------------------------------------------------------------


def _unet_forward_parts(spec: dict):
  """(function, its arguments) of one U-Net forward: params, latents, timesteps, context."""
  import jax
  import jax.numpy as jnp

  from jaxsd import pretrained

  dtype = _dtype(spec["dtype"])
  module, params = pretrained.load_unet(os.path.join(spec["model"], "unet"), dtype)
  b, h, w = spec["batch"], spec["latent"], spec["latent"]
  k = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(k[0], (b, h, w, module.config.in_channels), jnp.float32).astype(dtype)
  ctx = jax.random.normal(k[1], (b, 77, module.config.cross_attention_dim), jnp.float32).astype(dtype)
  t = jnp.full((b,), 500, jnp.int32)
  return (lambda p, x, t, c: module.apply({"params": p}, x, t, c)), (params, x, t, ctx)


def unet_forward(spec: dict) -> protocol.Case:
  fn, args = _unet_forward_parts(spec)
  compiled, info = compile_timed(fn, *args)
  return protocol.Case(lambda: protocol.timed(lambda: compiled(*args).block_until_ready()), info)


def vae_decode(spec: dict) -> protocol.Case:
  """The VAE decoder alone (post-quant conv + decoder), latents (B, h, w, 4) -> images, as
  diffusers' `AutoencoderKL.decode`."""
  import jax
  import jax.numpy as jnp

  from jaxsd import pretrained

  dtype = _dtype(spec["dtype"])
  module, params = pretrained.load_vae(os.path.join(spec["model"], "vae"), dtype)
  s = spec["latent"]
  z = jax.random.normal(jax.random.key(0), (spec["batch"], s, s, module.config.latent_channels), jnp.float32)
  compiled, info = compile_timed(lambda p, z: module.apply({"params": p}, z.astype(dtype), method=module.decode),
                                 params, z)
  return protocol.Case(lambda: protocol.timed(lambda: compiled(params, z).block_until_ready()), info)


def _pipeline_and_args(spec: dict):
  import jax
  import jax.numpy as jnp

  from jaxsd.pipeline import StableDiffusion

  pipe = StableDiffusion.from_pretrained(spec["model"], _dtype(spec["dtype"]))
  prompts = [PROMPT] * spec["batch"]
  guided = spec["guidance_scale"] > 1.0
  fn = pipe.generate_fn(spec["sampler"], spec["steps"], guided, "np")
  args = (pipe.params, pipe.tokenize(prompts), pipe.tokenize([""] * len(prompts)),
          pipe.noise(0, len(prompts), spec["height"],
                     spec["width"]), jnp.float32(spec["guidance_scale"]), pipe.sampler_keys(0, len(prompts)))
  return pipe, prompts, fn, args


def sample(spec: dict) -> protocol.Case:
  """One user-level `pipe(prompts, ...)` call: tokenize, text encode, the sampling loop, decode,
  images back on the host. Also times the pieces, for the loop-overhead figure."""
  import jax
  import jax.numpy as jnp

  pipe, prompts, _, args = _pipeline_and_args(spec)
  params, ids, uncond, noise, gs, _ = args
  # Model FLOPs are summed from the pieces: XLA's cost analysis of the whole program would count
  # the body of the sampling scan once. (The program's compile time is the `compile` workload's.)
  steps = spec["steps"]
  guided = spec["guidance_scale"] > 1.0
  b = len(prompts)
  ctx = jnp.zeros((2 * b if guided else b, 77, pipe.unet.config.cross_attention_dim), jnp.float32)
  x = noise
  tt = jnp.float32(500.0)
  unet_c, unet_i = compile_timed(lambda p, c, x, t: pipe.denoiser(p, c, gs, guided)(x, t), params["unet"], ctx, x, tt)
  text_c, text_i = compile_timed(lambda p, a, u: (pipe.encode_text(p, a), pipe.encode_text(p, u)),
                                 params["text_encoder"], ids, uncond)
  dec_c, dec_i = compile_timed(pipe.decode, params["vae"], x)
  pieces = {
      "unet_call_s": lambda: unet_c(params["unet"], ctx, x, tt).block_until_ready(),
      "text_encode_s": lambda: jax.block_until_ready(text_c(params["text_encoder"], ids, uncond)),
      "vae_decode_s": lambda: dec_c(params["vae"], x).block_until_ready(),
  }
  for fn in pieces.values():
    fn()  # warm
  call = lambda: pipe(prompts, height=spec["height"], width=spec["width"], steps=steps, guidance_scale=spec[
      "guidance_scale"], sampler=spec["sampler"], seed=0, output="np")
  t0 = time.perf_counter()
  call()  # compiles the pipeline's own jitted program (the one timed)
  first_call_s = time.perf_counter() - t0

  def run():  # the pieces are timed in the same round, for the loop-overhead figure
    return protocol.timed(call), {k: protocol.timed(fn) for k, fn in pieces.items()}

  info = {
      "flops": text_i["flops"] + steps * unet_i["flops"] + dec_i["flops"],
      "first_call_s": first_call_s,
      "unet_call_flops": unet_i["flops"],
      "images": b
  }
  return protocol.Case(run, info)


def noise_prediction_loss(module, sched):
  """The benchmark's U-Net loss on cached (latents, context) batches: epsilon MSE, uniform t."""
  import jax
  import jax.numpy as jnp

  from jaxsd.diffusion import schedules

  ac = schedules.alphas_cumprod(sched)

  def loss_fn(p, batch, rng, frozen):
    del frozen
    latents, context = batch
    k_noise, k_t = jax.random.split(rng)
    noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
    t = jax.random.randint(k_t, (latents.shape[0],), 0, sched.num_train_timesteps)
    noisy = schedules.add_noise(ac, latents, noise, t)
    pred = module.apply({"params": p}, noisy, t, context)
    return jnp.mean((pred.astype(jnp.float32) - noise)**2), {}

  return loss_fn


def _train_parts(spec: dict):
  """(compiled-to-be function, its arguments) of one U-Net train step on cached latents."""
  import jax
  import jax.numpy as jnp

  from jaxsd import pretrained
  from jaxsd.diffusion import schedules
  from jaxsd.training import optimizer
  from jaxsd.training.train_state import TrainState, make_train_step

  # fp32 master weights; the U-Net computes in `dtype` (bf16 on accelerators).
  module, params = pretrained.load_unet(os.path.join(spec["model"], "unet"), _dtype(spec["dtype"]), jnp.float32)
  sched = schedules.SchedulerConfig.from_json(os.path.join(spec["model"], "scheduler", "scheduler_config.json"))
  tx, _ = optimizer.make_optimizer({"lr": 1e-4, "warmup_steps": 0})  # AdamW, wd 1e-2, clip 1.0

  loss_fn = noise_prediction_loss(module, sched)
  # Created inside jit, as jaxsd's training loop does: `create` outside jit puts one zero buffer in
  # three fields, and a donated state must not hold the same buffer twice.
  state = jax.jit(lambda p: TrainState.create(p, tx))(params)
  b, s = spec["batch"], spec["latent"]
  k = jax.random.split(jax.random.key(1), 2)
  batch = (jax.random.normal(k[0], (b, s, s, module.config.in_channels), jnp.float32),
           jax.random.normal(k[1], (b, 77, module.config.cross_attention_dim), jnp.float32))
  return make_train_step(loss_fn, tx), (state, batch, jax.random.key(2))


def train(spec: dict) -> protocol.Case:
  import jax

  step, (state, batch, rng) = _train_parts(spec)
  compiled, info = compile_timed(step, state, batch, rng, donate_argnums=(0,))
  holder = {"state": state}

  def run():
    t0 = time.perf_counter()
    holder["state"], metrics = compiled(holder["state"], batch, rng)
    jax.block_until_ready((holder["state"], metrics))
    seconds = time.perf_counter() - t0
    return seconds, {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"])}

  info["images"] = spec["batch"]
  return protocol.Case(run, info)


def compile_only(spec: dict) -> protocol.Case:
  """Trace, lower and compile one program (sampling or training) and report the times."""
  if spec["program"] == "sample":
    _, _, fn, args = _pipeline_and_args(spec)
    _, info = compile_timed(fn, *args)
  else:
    step, args = _train_parts(spec)
    _, info = compile_timed(step, *args, donate_argnums=(0,))
  info["total_s"] = info["trace_lower_s"] + info["compile_s"]
  return protocol.Case(lambda: 0.0, info)


WORKLOADS = {
    "unet_forward": unet_forward,
    "vae_decode": vae_decode,
    "sample": sample,
    "train": train,
    "compile": compile_only
}


def setup(spec: dict) -> protocol.Case:
  _configure_jax(spec)
  case = WORKLOADS[spec["workload"]](spec)
  case.info.update(_device_facts())
  return case


def device_memory():
  import jax

  stats = jax.devices()[0].memory_stats()
  return stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats else None


if __name__ == "__main__":
  protocol.serve(setup, device_memory)
