"""The generic training loop (resume, sharded steps, logs, checkpoints, preemption); a benchmark.

A stage (CLIP, VAE, U-Net) calls `train_loop` with its `init_params(rng)`, its
`loss_fn(params, batch, rng, frozen) -> (loss, aux)`, an optax optimizer and a data iterator
that yields this host's numpy batches and has `get_state()` / `set_state()` (a grain
`DatasetIterator`). The resume order is in `checkpoint.py`'s docstring.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from jaxsd.training import checkpoint as ckpt_lib
from jaxsd.training import metrics as metrics_lib
from jaxsd.training import sharding as sharding_lib
from jaxsd.training.train_state import LossFn, TrainState, make_train_step

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PeriodicCallback:
  """Calls `fn(step, state, writer)` after every `every`-th step (e.g. to write sample grids).

  The state is donated to the next step: finish using it inside `fn`.
  """
  every: int
  fn: Callable[[int, TrainState, metrics_lib.MetricWriter], None]


class LoopResult(NamedTuple):
  state: TrainState
  step: int
  preempted: bool  # True when SIGTERM stopped the loop early; the CLI should exit without export.
  source: str  # "checkpoint", "resume_path", "initial_params" or "scratch".
  compile_seconds: float


class _Preemption:
  """Stops the loop at a step boundary when the job is being preempted.

  One process: SIGTERM sets a flag (handler installed from the main thread only). Several
  processes: jax's preemption sync point (the coordination service turns SIGTERM on any host
  into a common step at which every host stops), which needs `jax.distributed.initialize()`.
  """

  def __init__(self, enabled: bool):
    self.flag = False
    self._previous = None
    self._multihost = enabled and jax.process_count() > 1
    if enabled and not self._multihost and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    log.warning("SIGTERM: finishing the current step, then saving a checkpoint and exiting.")
    self.flag = True

  def reached(self, step: int) -> bool:
    if self._multihost:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError as e:
        log.warning("No preemption handling across hosts: %s", e)
        self._multihost = False
    return self.flag

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _check_like(tree: Any, abstract: Any, what: str) -> None:
  """Clear error when `tree` does not match the structure and shapes the model expects."""
  got = jax.tree_util.tree_flatten_with_path(tree)[0]
  want = jax.tree_util.tree_flatten_with_path(abstract)[0]
  got_d = {jax.tree_util.keystr(p): np.shape(x) for p, x in got}
  want_d = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in want}
  missing = sorted(set(want_d) - set(got_d))
  extra = sorted(set(got_d) - set(want_d))
  shapes = sorted(k for k in set(want_d) & set(got_d) if tuple(got_d[k]) != want_d[k])
  if missing or extra or shapes:
    lines = [f"{what} do not match the model's parameters:"]
    lines += [f"  missing {k} {want_d[k]}" for k in missing[:10]]
    lines += [f"  unexpected {k} {got_d[k]}" for k in extra[:10]]
    lines += [f"  shape of {k}: got {got_d[k]}, want {want_d[k]}" for k in shapes[:10]]
    raise ValueError("\n".join(lines))


def _initial_state(*, ckpt, target, shardings, create_fn, init_rng, tx, ema_decay, initial_params,
                   resume_from) -> tuple[TrainState, Any, str]:
  """The resume order: workdir checkpoint, explicit path, initial weights, scratch."""
  restored = ckpt.restore_latest(target)
  if restored is not None:
    log.info("Resuming from %s step %d.", ckpt.directory, restored.step)
    return restored.state, restored.data_state, "checkpoint"
  if resume_from:
    restored = ckpt_lib.restore_path(resume_from, target)
    log.info("Resuming from %s (step %d).", resume_from, restored.step)
    return restored.state, restored.data_state, "resume_path"
  if initial_params is not None:
    params = initial_params() if callable(initial_params) else initial_params
    _check_like(params, target.params, "The initial params")
    # device_put may reuse the caller's buffers (even with may_alias=False); the jit below, not
    # donated, gives the state fresh ones, so the train step's donation leaves them intact.
    params = sharding_lib.put(params, shardings.params)
    state = jax.jit(lambda p: TrainState.create(p, tx, ema_decay), out_shardings=shardings)(params)
    return state, None, "initial_params"
  return jax.jit(create_fn, out_shardings=shardings)(init_rng), None, "scratch"


def train_loop(
    *,
    workdir: str,
    mesh: Mesh,
    init_params: Callable[[jax.Array], Any],
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    data: Iterator[Any],
    total_steps: int,
    frozen: Any = None,
    lr_schedule: Callable[[Any], Any] | None = None,
    seed: int = 0,
    ema_decay: float | None = None,
    ema_warmup: bool = True,
    initial_params: Any = None,
    resume_from: str | None = None,
    log_every: int = 50,
    checkpoint_every: int = 1000,
    max_to_keep: int = 3,
    async_checkpointing: bool = True,
    max_consecutive_nonfinite: int = 20,
    min_shard_size: int = sharding_lib.DEFAULT_MIN_SHARD_SIZE,
    callbacks: Sequence[PeriodicCallback] = (),
    on_start: Callable[[TrainState, int], None] | None = None,
    progress: bool = True,
    tensorboard: bool = True,
    handle_sigterm: bool = True,
) -> LoopResult:
  """Trains to `total_steps` train steps, resuming from `workdir` when it holds a checkpoint.

  Args:
    workdir: checkpoints, metrics.jsonl and TensorBoard files go here.
    mesh: from `sharding.make_mesh`; the batch is split over data x fsdp, the state over fsdp.
    init_params: `rng -> params` (fp32), traced for shapes and run sharded for scratch init.
    loss_fn: `(params, batch, rng, frozen) -> (loss, aux)`.
    tx: the optimizer (`optimizer.make_optimizer`).
    data: yields this host's batches (pytrees of numpy arrays with a leading batch axis); with
      `get_state()`/`set_state()` its position is checkpointed and restored.
    total_steps: train steps to reach (a resumed run does the remainder).
    frozen: networks that are not trained, passed to every step undonated; placed on the mesh
      with the fsdp rule unless they already live there (`sharding.shard_tree`).
    initial_params: params (or a zero-argument callable returning them) to start from when no
      checkpoint exists, e.g. converted pretrained weights.
    resume_from: explicit checkpoint to resume from when the workdir has none.
    max_consecutive_nonfinite: raise after this many skipped steps in a row (checked at log
      steps, so keep `log_every` below it).
    callbacks: `PeriodicCallback`s, e.g. the U-Net stage's sample grids.
    on_start: `(state, step) -> None`, called once with the state the loop starts from (made, restored or
      converted), before the train step compiles; e.g. the U-Net stage exports its starting weights.
    handle_sigterm: on preemption (SIGTERM), finish the step, save synchronously, return with
      `preempted=True`.

  Returns:
    LoopResult(state, step, preempted, source, compile_seconds).
  """
  if total_steps < 1 or log_every < 1 or checkpoint_every < 1:
    raise ValueError(f"total_steps={total_steps}, log_every={log_every} and checkpoint_every="
                     f"{checkpoint_every} must all be >= 1.")
  writer = metrics_lib.MetricWriter(workdir, tensorboard=tensorboard)
  ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=max_to_keep, save_interval_steps=checkpoint_every,
                               async_save=async_checkpointing)
  preemption = _Preemption(handle_sigterm)
  bar = None
  try:
    init_rng, train_rng = jax.random.split(jax.random.key(seed))
    create_fn = lambda r: TrainState.create(init_params(r), tx, ema_decay)  # noqa: E731
    abstract = jax.eval_shape(create_fn, init_rng)
    shardings = sharding_lib.tree_shardings(abstract, mesh, min_shard_size)
    target = sharding_lib.with_shardings(abstract, shardings)

    state, data_state, source = _initial_state(ckpt=ckpt, target=target, shardings=shardings, create_fn=create_fn,
                                               init_rng=init_rng, tx=tx, ema_decay=ema_decay,
                                               initial_params=initial_params, resume_from=resume_from)
    can_save_data = hasattr(data, "get_state") and hasattr(data, "set_state")
    if not can_save_data:
      log.warning("The data iterator has no get_state()/set_state(): a resume restarts the data.")
    elif data_state is not None:
      data.set_state(data_state)
    data_position = lambda: data.get_state() if can_save_data else None  # noqa: E731
    step = int(jax.device_get(state.step))
    log.info("Starting at step %d (%s).", step, source)
    if on_start is not None:
      on_start(state, step)

    if not all(
        isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
        for x in jax.tree.leaves(frozen)):
      frozen = sharding_lib.shard_tree(frozen, mesh, min_shard_size)
    train_rng = sharding_lib.put(train_rng, sharding_lib.replicated(mesh))
    step_fn = make_train_step(loss_fn, tx, ema_decay=ema_decay, ema_warmup=ema_warmup, lr_schedule=lr_schedule)
    if step >= total_steps:
      return LoopResult(state, step, False, source, 0.0)

    batch_np = next(data)
    compiled, compile_seconds = sharding_lib.compile_train_step(step_fn, mesh, shardings, abstract, batch_np, train_rng,
                                                                frozen)
    # The first step's collectives start together, however long each process took to compile.
    sharding_lib.sync_processes("jaxsd: train step compiled")
    global_batch = jax.tree.leaves(batch_np)[0].shape[0] * jax.process_count()
    log.info("Compiled the train step in %.1f s (global batch %d).", compile_seconds, global_batch)
    writer.write_scalars(step, {"compile_seconds": compile_seconds})

    bar = metrics_lib.ProgressBar(total_steps, step, enabled=progress)
    preempted = False
    t_last, step_last = time.perf_counter(), step
    while True:
      batch = sharding_lib.make_global_batch(batch_np, mesh)
      state, metrics = compiled(state, batch, train_rng, frozen)
      step += 1

      if step % log_every == 0 or step == total_steps:
        m, consecutive, total_bad = jax.device_get((metrics, state.consecutive_nonfinite, state.nonfinite_count))
        now = time.perf_counter()
        ips = global_batch * (step - step_last) / max(now - t_last, 1e-9)
        t_last, step_last = now, step
        scalars = dict(m, images_per_sec=ips, nonfinite_count=total_bad)
        writer.write_scalars(step, scalars)
        bar.update(step, float(m["loss"]), ips)
        if consecutive >= max_consecutive_nonfinite:
          raise RuntimeError(f"{int(consecutive)} non-finite steps in a row at step {step} (loss={m['loss']}, "
                             f"grad_norm={m['grad_norm']}); params were left unchanged by these steps. Lower "
                             "the learning rate, check the data and the loss_fn's compute dtype. The last saved "
                             f"checkpoint is step {ckpt.latest_step()}.")

      if step % checkpoint_every == 0:
        ckpt.save(step, state, data_position())
      for cb in callbacks:
        if step % cb.every == 0:
          cb.fn(step, state, writer)

      if preemption.reached(step):
        log.warning("Preempted: saving step %d and exiting.", step)
        ckpt.save(step, state, data_position(), force=True)
        ckpt.wait_until_finished()
        preempted = True
        break
      if step >= total_steps:
        break
      try:
        batch_np = next(data)
      except StopIteration:
        log.warning("The data iterator ended at step %d before total_steps=%d.", step, total_steps)
        break

    if not preempted:
      ckpt.save(step, state, data_position(), force=True)
    ckpt.wait_until_finished()
    writer.flush()
    return LoopResult(state, step, preempted, source, compile_seconds)
  finally:
    preemption.restore()
    if bar is not None:
      bar.close()
    ckpt.close()
    writer.close()
