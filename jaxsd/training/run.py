"""`train_and_evaluate(config, workdir)`: the stages in order, each resumable, then the prompt-match report.

Layout of a workdir:
  <stage>/checkpoints/<step>/   orbax checkpoints of the stage (train state + data position)
  <stage>/metrics.jsonl         metrics, and TensorBoard event files beside it
  <stage>/result.json           written when the stage is finished: a rerun skips the stage
  model/                        the trained model as a diffusers Stable Diffusion folder (+ clip/)
  lora/                         LoRA training instead (config.lora): checkpoints, metrics and the adapter,
                                pytorch_lora_weights.safetensors; the base model (config.init) is not copied
  class_images/                 DreamBooth's class images drawn by the init model (config.dreambooth), kept
  controlnet/                   ControlNet training instead (config.controlnet): checkpoints, metrics and the
                                ControlNet as a diffusers folder (config.json + safetensors); init not copied
  samples/                      sample grids; report.md and summary.json at the end
Rerunning the same command resumes where it stopped (see jaxsd.training.checkpoint for the order).
The config's checks and derived settings are `jaxsd.training.run_config`; the stages' batches, `jaxsd.training.inputs`;
the judged report, `jaxsd.training.report`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections

from jaxsd import lora as lora_lib
from jaxsd import lora_export
from jaxsd import lora_names
from jaxsd import pretrained
from jaxsd import token_embeddings
from jaxsd.flops import benchmark, model_flops, peak_flops_per_device
from jaxsd import tokenizer as tok
from jaxsd.data import builtin, input_pipeline
from jaxsd.diffusion import SchedulerConfig
from jaxsd.image_grid import contact_sheet, save_png
from jaxsd.pipeline import StableDiffusion
from jaxsd.pipeline_folders import load_vae
from jaxsd.pipeline_xl import StableDiffusionXL
from jaxsd.training import controlnet_training, evaluate, export, lora_training, report, stages
from jaxsd.training.inputs import ensure_dataset, global_rows, make_input, unet_batches
from jaxsd.training.loop import PeriodicCallback, train_loop
from jaxsd.training.optimizer import make_optimizer, with_group_lr
from jaxsd.training import sharding
from jaxsd.training import workdir as workdir_lib
from jaxsd.training.processes import primary, primary_first, sync
from jaxsd.training.run_config import (ConfigError, check_config, data_dir, is_dreambooth, is_lora, is_sdxl, mask_key,
                                       mesh_devices, optimizer_settings, read_json, resolve_init, section, stage_names)
from jaxsd.config import write_json_object

log = logging.getLogger(__name__)

# --- stages ------------------------------------------------------------------------------------


class Preempted(Exception):
  """Training stopped on SIGTERM after saving; rerun the same command to resume."""


def _optimizer(cfg, stage):
  """The stage's optimizer and learning-rate schedule; a text encoder trained with the U-Net at its own rate
  (`unet.text_encoder_lr`)."""
  c = cfg[section(stage.name)]
  tx, schedule = make_optimizer(optimizer_settings(cfg, stage.name))
  if stage.name == "unet" and c.get("train_text_encoder") and c.get("text_encoder_lr"):
    tx = with_group_lr(tx, "text_encoder", c.text_encoder_lr / c.optimizer.lr)
  return tx, schedule


def _loop(cfg, workdir, stage, mesh, data, *, ema_decay=None, callbacks=(), on_start=None):
  """Trains a stage on the iterator `data`; on SIGTERM closes `data` and raises Preempted."""
  c = cfg[section(stage.name)]
  tx, schedule = _optimizer(cfg, stage)
  res = train_loop(workdir=os.path.join(workdir, stage.name), mesh=mesh, init_params=stage.init_params,
                   loss_fn=stage.loss_fn, tx=tx, data=data, total_steps=c.steps, frozen=stage.frozen,
                   lr_schedule=schedule, seed=cfg.seed, ema_decay=ema_decay, initial_params=stage.initial_params,
                   log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, max_to_keep=cfg.max_to_keep,
                   callbacks=callbacks, on_start=on_start, progress=cfg.progress)
  if res.preempted:
    data.close()
    raise Preempted
  return res


def _run_facts(res, t0: float) -> dict:
  """The result.json fields every stage reports about its training run."""
  return dict(steps=res.step, train_seconds=round(time.time() - t0, 1), compile_seconds=round(res.compile_seconds, 2))


def _evaluate(cfg, name, tokenizer, metric_fn, model, params, examples, **input_kw) -> dict:
  """`metric_fn(model, params, batches, examples)` over the test split, batches of 100."""
  it = iter(make_input(cfg, name, tokenizer, train=False, batch_size=100, **input_kw))
  metrics = metric_fn(model, params, it, examples)
  it.close()
  return metrics


def _check_test_split(cfg, evaluating: list[str]) -> None:
  """The clip and vae stages end by evaluating on config.data.test_split: refuse before training when it is not
  there (a folder prepared with prepare_image_folder's default test_fraction=0 has a train split only)."""
  d = cfg.data
  if cfg.benchmark_steps or not evaluating:
    return
  splits = input_pipeline.split_names(d.name, data_dir(cfg))
  if d.test_split.split("[")[0] not in splits:
    raise ConfigError(f"config.data.test_split={d.test_split!r}: dataset {d.name!r} has only {', '.join(splits)}, and "
                      f"the {' and '.join(evaluating)} stage(s) evaluate on the test split. Prepare the dataset with "
                      "a test split (prepare_image_folder(..., test_fraction=0.05, overwrite=True)), or set "
                      "config.data.test_split to one of its splits.")


def _done(workdir, name) -> dict | None:
  path = os.path.join(workdir, name, "result.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


def _finish(workdir, name, result: dict) -> dict:
  if primary():
    os.makedirs(os.path.join(workdir, name), exist_ok=True)
    write_json_object(os.path.join(workdir, name, "result.json"), result, indent=2)  # the stage's done marker
  log.info("%s stage: %s", name, json.dumps(result))
  return result


def run_clip(cfg, workdir, mesh, tokenizer) -> dict:
  stage = stages.clip_stage(cfg)
  it = iter(make_input(cfg, "clip", tokenizer))
  t0 = time.time()
  res = _loop(cfg, workdir, stage, mesh, it)
  it.close()
  model, params = stage.modules["clip"], sharding.to_host(res.state.params)
  te, te_params = stages.text_encoder_from_clip(model, params)
  tokenizer.model_max_length = cfg.clip.text.max_position_embeddings  # so diffusers pads to our length
  if primary():
    export.export_component(workdir, "clip", model, params, res.step)
    export.export_component(workdir, "text_encoder", te, te_params, res.step)
    export.export_tokenizer(workdir, tokenizer)
  metrics = _evaluate(cfg, "clip", tokenizer, evaluate.clip_retrieval, model, params, cfg.clip.eval_examples,
                      captions=True)
  return _finish(workdir, "clip", dict(metrics, **_run_facts(res, t0)))


def run_vae(cfg, workdir, mesh, tokenizer) -> dict:
  stage = stages.vae_stage(cfg)
  it = iter(make_input(cfg, "vae", tokenizer, mask=mask_key(cfg, "vae")))
  t0 = time.time()
  res = _loop(cfg, workdir, stage, mesh, it)
  model, params = stage.modules["vae"], sharding.to_host(res.state.params)
  sample = global_rows(next(it)["image"])
  it.close()
  factor = stages.measure_scaling_factor(model, params, sample, jax.random.key(cfg.seed))
  model = model.clone(config=model.config.replace(scaling_factor=factor))
  if primary():
    export.export_component(workdir, "vae", model, params, res.step)
  metrics = _evaluate(cfg, "vae", tokenizer, evaluate.vae_reconstruction, model, params, cfg.vae.eval_examples)
  return _finish(workdir, "vae", dict(metrics, scaling_factor=factor, **_run_facts(res, t0)))


def run_unet(cfg, workdir, mesh, tokenizer) -> dict:
  dtype = stages.dtype_of(cfg)
  sdxl = is_sdxl(cfg)
  mdir = export.model_dir(workdir)
  if cfg.init and primary():
    export.copy_from_init(cfg.init, workdir)
  sync("jaxsd: model folder")
  if cfg.init:
    unet, unet_params = pretrained.load_unet(os.path.join(cfg.init, "unet"), dtype, jnp.float32,
                                             gradient_checkpointing=cfg.unet.gradient_checkpointing)
    scheduler = SchedulerConfig.from_json(os.path.join(cfg.init, "scheduler"))
  else:
    unet, unet_params = None, None
    scheduler = stages.scheduler_config(cfg)
    if primary() and not cfg.benchmark_steps:
      export.write_scheduler(scheduler, os.path.join(mdir, "scheduler"))
      export.write_model_index(mdir)
  if cfg.benchmark_steps and not cfg.init and not os.path.isdir(os.path.join(mdir, "vae")):
    # Timing the U-Net step needs VAE and text encoder of the configured sizes, not trained ones.
    vae, vae_params, te, te_params = stages.untrained_frozen_networks(cfg, jax.random.key(cfg.seed))
  elif sdxl:  # the VAE as SDXL's pipelines run it: fp32 for float16 compute where force_upcast (fp16 overflows)
    vae, vae_params = load_vae(os.path.join(mdir, "vae"), dtype)
    te, te_params = pretrained.load_text_encoder(os.path.join(mdir, "text_encoder"), dtype, jnp.float32,
                                                 projection=False)
  else:
    vae, vae_params = pretrained.load_vae(os.path.join(mdir, "vae"), dtype, jnp.float32)
    te, te_params = pretrained.load_text_encoder(os.path.join(mdir, "text_encoder"), dtype, jnp.float32)
  xl = {}
  if sdxl:
    te2, te2_params = pretrained.load_text_encoder(os.path.join(mdir, "text_encoder_2"), dtype, jnp.float32,
                                                   projection=True)
    xl = dict(text_encoder_2=te2, text_params_2=te2_params,
              tokenizer_2=tok.load_tokenizer(os.path.join(mdir, "tokenizer_2")))
  if unet is None:
    from jaxsd.models.unet import UNet2DConditionModel

    unet = UNet2DConditionModel(stages.unet_config(cfg, vae.config, te.config), dtype=dtype,
                                gradient_checkpointing=cfg.unet.gradient_checkpointing)
  stage = stages.unet_stage(cfg, unet=unet, vae=vae, vae_params=vae_params, text_encoder=te, text_params=te_params,
                            scheduler=scheduler, tokenizer=tokenizer, initial_params=unet_params,
                            prior_loss_weight=_prior_loss_weight(cfg), **xl)
  if sdxl:
    sampling_pipe = StableDiffusionXL(unet, unet_params, vae, vae_params, te, te_params, tokenizer, scheduler,
                                      text_encoder_2=xl["text_encoder_2"], text_encoder_2_params=xl["text_params_2"],
                                      tokenizer_2=xl["tokenizer_2"], model_index=read_json(mdir, "model_index.json"))
  else:
    sampling_pipe = StableDiffusion(unet, unet_params, vae, vae_params, te, te_params, tokenizer, scheduler)
  it = unet_batches(cfg, workdir, tokenizer, sampling_pipe, tokenizer_2=xl.get("tokenizer_2"))

  if cfg.benchmark_steps:
    return _benchmark(cfg, stage, mesh, it)

  prompts, columns = builtin.sample_prompts(cfg.data.name, cfg.unet.get("sample_prompts", ()))
  if is_dreambooth(cfg) and not cfg.unet.get("sample_prompts"):
    prompts = [p for p in (cfg.dreambooth.instance_prompt, cfg.dreambooth.class_prompt) if p]
  samples_dir = os.path.join(workdir, "samples")
  quality = None
  if report.judged(cfg):
    with primary_first("jaxsd: judge trained"):
      quality = report.quality_eval(cfg, workdir, tokenizer)[0]

  def write_samples(step, state, writer):
    # One pipeline object for every grid: its compiled program is reused, only the params change.
    params = state.ema_params if state.ema_params is not None else state.params
    if jax.process_count() > 1:  # on every process whole: each samples on its own devices
      params = sharding.to_host(params)
    sampling_pipe.unet_params, trained_te = stages.split_unet_params(params)
    if trained_te is not None:
      sampling_pipe.text_encoder_params = trained_te
    pipe = sampling_pipe
    size = cfg.data.image_size
    images = pipe(prompts, height=size, width=size, steps=cfg.unet.sample_steps, sampler=cfg.unet.sampler,
                  guidance_scale=cfg.unet.guidance_scale, seed=cfg.seed)
    grid = contact_sheet(images, columns=columns)
    if primary():
      os.makedirs(samples_dir, exist_ok=True)
      save_png(grid, os.path.join(samples_dir, f"step_{step:06d}.png"))
    writer.write_images(step, {"samples": grid})
    if quality is not None and step < cfg.unet.steps:  # the final point is the report's
      scores = quality(pipe, final=False)
      scores.pop("prompt_match")
      log.info("step %d: %s", step, json.dumps(scores))
      writer.write_scalars(step, scores)

  def export_start(state, step):
    # The U-Net the loop starts from, exported once, so `python -m sample --model <workdir>` works from the
    # first checkpoint on (it swaps in the newest checkpoint's EMA weights).
    if os.path.exists(os.path.join(mdir, "unet", "jaxsd_step.json")):
      return
    params = sharding.to_host(state.params)  # on every process (a gather where fsdp spans processes)
    if primary():  # writes after the gather, so no process can have seen the file and skipped it
      export.export_component(workdir, "unet", unet, stages.split_unet_params(params)[0], step)

  callbacks = [PeriodicCallback(cfg.unet.sample_every, write_samples)] if cfg.unet.sample_every else []
  t0 = time.time()
  res = _loop(cfg, workdir, stage, mesh, it, ema_decay=cfg.unet.ema_decay or None, callbacks=callbacks,
              on_start=export_start)
  it.close()
  state = res.state
  final_unet, final_te = stages.split_unet_params(
      sharding.to_host(state.ema_params if state.ema_params is not None else state.params))
  if primary():
    if final_te is not None:
      export.export_component(workdir, "text_encoder", te, final_te, res.step)
    export.export_component(workdir, "unet", unet, final_unet, res.step)
  write_samples(res.step, state, _NullWriter())
  return _finish(workdir, "unet", dict(_run_facts(res, t0), ema=state.ema_params is not None))


def run_lora(cfg, workdir, mesh, tokenizer) -> dict:
  """LoRA adapters trained on the U-Net of `cfg.init` (jaxsd.training.lora_training), the U-Net stage's loss and
  settings (cfg.unet); the adapter goes to DIR/lora/pytorch_lora_weights.safetensors (diffusers / PEFT naming,
  or kohya's: for SDXL with sd-scripts' sgm U-Net names). The base model is not exported: the adapter applies to
  cfg.init's, which is unchanged. SDXL: the inputs of run_unet's SDXL fine-tune; with lora.train_text_encoder
  adapters on both text encoders."""
  dtype = stages.dtype_of(cfg)
  sdxl = is_sdxl(cfg)
  unet, unet_params = pretrained.load_unet(os.path.join(cfg.init, "unet"), dtype, jnp.float32,
                                           gradient_checkpointing=cfg.unet.gradient_checkpointing)
  xl = {}
  if sdxl:  # as run_unet: the VAE as SDXL's pipelines run it, the second encoder with its projection
    vae, vae_params = load_vae(os.path.join(cfg.init, "vae"), dtype)
    te, te_params = pretrained.load_text_encoder(os.path.join(cfg.init, "text_encoder"), dtype, jnp.float32,
                                                 projection=False)
    te2, te2_params = pretrained.load_text_encoder(os.path.join(cfg.init, "text_encoder_2"), dtype, jnp.float32,
                                                   projection=True)
    xl = dict(text_encoder_2=te2, text_params_2=te2_params,
              tokenizer_2=tok.load_tokenizer(os.path.join(cfg.init, "tokenizer_2")))
  else:
    vae, vae_params = pretrained.load_vae(os.path.join(cfg.init, "vae"), dtype, jnp.float32)
    te, te_params = pretrained.load_text_encoder(os.path.join(cfg.init, "text_encoder"), dtype, jnp.float32)
  scheduler = SchedulerConfig.from_json(os.path.join(cfg.init, "scheduler"))
  try:
    spec = lora_training.make_spec(unet_params, cfg.lora, te_params, xl.get("text_params_2"), tokenizer)
  except ValueError as e:
    raise ConfigError(f"config.lora: {e}") from None
  base = stages.unet_stage(cfg, unet=unet, vae=vae, vae_params=vae_params, text_encoder=te, text_params=te_params,
                           scheduler=scheduler, tokenizer=tokenizer, prior_loss_weight=_prior_loss_weight(cfg),
                           text_gradient=spec.structured, **xl)
  rows = lora_training.initial_token_rows(spec, te_params, tokenizer, cfg.lora.get("token_init", "")) \
      if spec.tokens else None
  stage = lora_training.lora_stage(base, unet_params, spec, rows)
  if sdxl:
    pipe = StableDiffusionXL(unet, unet_params, vae, vae_params, te, te_params, tokenizer, scheduler,
                             text_encoder_2=xl["text_encoder_2"], text_encoder_2_params=xl["text_params_2"],
                             tokenizer_2=xl["tokenizer_2"], model_index=read_json(cfg.init, "model_index.json"))
  else:
    pipe = StableDiffusion(unet, unet_params, vae, vae_params, te, te_params, tokenizer, scheduler)
  it = unet_batches(cfg, workdir, tokenizer, pipe, tokenizer_2=xl.get("tokenizer_2"))
  if cfg.benchmark_steps:
    return dict(_benchmark(cfg, stage, mesh, it), stage="lora", **lora_training.describe(spec))
  t0 = time.time()
  res = _loop(cfg, workdir, stage, mesh, it, ema_decay=cfg.unet.ema_decay or None)
  it.close()
  state = res.state
  trained = sharding.to_host(state.ema_params if state.ema_params is not None else state.params)
  facts = {}
  if spec.targets or spec.text_targets:
    adapter = lora_training.to_adapter(spec, trained)
    # sd-scripts names an SDXL U-Net's layers as Stability's (sgm) U-Net does; A1111 expects those.
    unet_names = lora_names.sgm_names(lora_lib.kernel_modules(unet_params)) if sdxl else None
    path = os.path.join(workdir, "lora", lora_lib.WEIGHT_NAME)
    if primary():  # every process holds the same adapter; two writing one file race on its .tmp
      lora_export.save(adapter, path, cfg.lora.export_format, unet_names=unet_names)
    facts.update(file=path, format=cfg.lora.export_format)
  if spec.tokens:
    facts["embeddings_file"] = os.path.join(workdir, "lora", token_embeddings.WEIGHT_NAME)
    if primary():
      token_embeddings.save(trained["token_embeddings"], facts["embeddings_file"])
  return _finish(workdir, "lora",
                 dict(_run_facts(res, t0), ema=state.ema_params is not None, **facts, **lora_training.describe(spec)))


def run_controlnet(cfg, workdir, mesh, tokenizer) -> dict:
  """A ControlNet trained for the model of `cfg.init` (jaxsd.training.controlnet_training), initialised from its
  U-Net's encoder, with the U-Net stage's loss and settings (cfg.unet); exported to DIR/controlnet as a diffusers
  ControlNetModel folder (`jaxsd.load_controlnet`, `pipe.with_controlnet`, diffusers' from_pretrained)."""
  dtype = stages.dtype_of(cfg)
  unet, unet_params = pretrained.load_unet(os.path.join(cfg.init, "unet"), dtype, jnp.float32,
                                           gradient_checkpointing=cfg.unet.gradient_checkpointing)
  vae, vae_params = pretrained.load_vae(os.path.join(cfg.init, "vae"), dtype, jnp.float32)
  te, te_params = pretrained.load_text_encoder(os.path.join(cfg.init, "text_encoder"), dtype, jnp.float32)
  scheduler = SchedulerConfig.from_json(os.path.join(cfg.init, "scheduler"))
  try:
    widths = controlnet_training.embedding_widths(vae.config.downsampling_factor,
                                                  cfg.controlnet.conditioning_embedding_out_channels)
  except ValueError as e:
    raise ConfigError(f"config.controlnet: {e}") from None
  controlnet, controlnet_params = controlnet_training.controlnet_from_unet(unet, unet_params, widths,
                                                                           jax.random.key(cfg.seed))
  stage = controlnet_training.controlnet_stage(cfg, controlnet=controlnet, controlnet_params=controlnet_params,
                                               unet=unet, unet_params=unet_params, vae=vae, vae_params=vae_params,
                                               text_encoder=te, text_params=te_params, scheduler=scheduler,
                                               tokenizer=tokenizer)
  it = iter(make_input(cfg, "unet", tokenizer))
  t0 = time.time()
  res = _loop(cfg, workdir, stage, mesh, it, ema_decay=cfg.unet.ema_decay or None)
  it.close()
  state = res.state
  params = sharding.to_host(state.ema_params if state.ema_params is not None else state.params)
  path = os.path.join(workdir, "controlnet")
  if primary():
    pretrained.save_pretrained(controlnet, params, path)
  return _finish(
      workdir, "controlnet",
      dict(_run_facts(res, t0), ema=state.ema_params is not None, folder=path,
           conditioning=cfg.controlnet.conditioning))


def _prior_loss_weight(cfg) -> float:
  return float(cfg.dreambooth.prior_loss_weight) if is_dreambooth(cfg) else 1.0


class _NullWriter:

  def write_images(self, *a, **k):
    pass


def _benchmark(cfg, stage, mesh, it) -> dict:
  """Compiles the U-Net train step, times `benchmark_steps` steps, returns the JSON-able figures."""
  from jaxsd.training.train_state import TrainState, make_train_step

  tx, schedule = _optimizer(cfg, stage)
  create = lambda r: TrainState.create(stage.init_params(r), tx, cfg.unet.ema_decay or None)  # noqa: E731
  abstract = jax.eval_shape(create, jax.random.key(0))
  shard = sharding.tree_shardings(abstract, mesh)
  state = jax.jit(create, out_shardings=shard)(jax.random.key(0))
  frozen = sharding.shard_tree(stage.frozen, mesh)
  rng = sharding.put(jax.random.key(1), sharding.replicated(mesh))
  batch_np = {k: v for k, v in next(it).items()}
  it.close()
  step_fn = make_train_step(stage.loss_fn, tx, ema_decay=cfg.unet.ema_decay or None, lr_schedule=schedule)
  compiled, compile_s = sharding.compile_train_step(step_fn, mesh, shard, abstract, batch_np, rng, frozen)
  step_flops = model_flops(step_fn, abstract, batch_np, rng, frozen)
  batch = sharding.make_global_batch(batch_np, mesh)
  _, figures = benchmark(compiled, state, batch, rng, frozen, steps=cfg.benchmark_steps, compile_seconds=compile_s,
                         flops=step_flops)
  return dict(figures, stage="unet", device_kind=jax.devices()[0].device_kind,
              peak_flops=peak_flops_per_device(jax.devices()[0].device_kind))


# --- the whole run -----------------------------------------------------------------------------


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the configured stages in order (skipping finished ones), then the prompt-match report."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  resolve_init(cfg)
  check_config(cfg, len(mesh_devices(cfg)))
  with _config_error():
    workdir_lib.check_workdir(workdir, cfg.init)
  names = stage_names(cfg)
  if cfg.benchmark_steps:  # times the U-Net step alone: the other stages are neither run nor needed
    names = ["lora"] if is_lora(cfg) and cfg.init else ["unet"]
  elif "unet" in names and not cfg.init:
    for need, stage in (("text_encoder", "clip"), ("vae", "vae")):
      if stage not in names and not os.path.isdir(os.path.join(export.model_dir(workdir), need)):
        raise ConfigError(f"the unet stage needs a trained {need}: run the {stage} stage first (config.stages) "
                          f"in this workdir, or fine-tune a pretrained model with --config.init=<diffusers folder>.")
  if not is_dreambooth(cfg):  # DreamBooth reads its image folders, not a prepared dataset
    ensure_dataset(cfg)
    _check_test_split(cfg, [n for n in names if n in ("clip", "vae") and _done(workdir, n) is None])
  config_json = cfg.to_json_best_effort(indent=2)
  with _config_error():
    workdir_lib.check_same_config(config_json, workdir)
    with workdir_lib.lock(workdir, enabled=primary()):
      if primary():
        workdir_lib.write_config(config_json, workdir)
      return _run_stages(cfg, workdir, names)


@contextlib.contextmanager
def _config_error() -> Iterator[None]:
  """The workdir's refusals as the ConfigError the command line reports in one line (exit 2)."""
  try:
    yield
  except workdir_lib.WorkdirError as e:
    raise ConfigError(str(e)) from None


def _run_stages(cfg, workdir: str, names: list[str]) -> dict:
  """The stages in order, then the report, in a workdir this process holds."""
  mesh = sharding.make_mesh(data=cfg.mesh.data, fsdp=cfg.mesh.fsdp, devices=mesh_devices(cfg))
  tokenizer = tok.load_tokenizer(cfg.init or None)
  results = {}
  t0 = time.time()
  for name in names:
    done = _done(workdir, name)
    if done is not None and not cfg.benchmark_steps:
      log.info("%s stage already finished; skipping (delete %s to redo it).", name,
               os.path.join(workdir, name, "result.json"))
      if done.get("steps") is not None and done["steps"] != cfg[section(name)].steps:
        log.warning("the %s stage finished at step %s; config.%s.steps=%s is not trained (delete %s to train it).",
                    name, done["steps"], section(name), cfg[section(name)].steps,
                    os.path.join(workdir, name, "result.json"))
      results[name] = done
      continue
    runner = {"clip": run_clip, "vae": run_vae, "unet": run_unet, "lora": run_lora, "controlnet": run_controlnet}[name]
    results[name] = runner(cfg, workdir, mesh, tokenizer)
    sync(f"jaxsd: {name} stage exported")  # the next stage reads what process 0 wrote
    if cfg.benchmark_steps:
      return results[name]
  if (primary() and "unet" in results and not cfg.init and report.judged(cfg) and
      os.path.isdir(os.path.join(workdir, "model", "clip"))):  # written by process 0, from its own samples
    results["prompt_match"] = report.write(cfg, workdir, tokenizer, step=int(results["unet"]["steps"]))
  results["wall_seconds_this_run"] = round(time.time() - t0, 1)
  if primary():
    write_json_object(os.path.join(workdir, "summary.json"), results, indent=2)
  return results
