"""A toy regression task (2-layer MLP) for the training tests; also a script for subprocess runs.

  python tests/training/toy_train.py --workdir W --steps 30 --out params.npz [--sleep 0.05]

trains with `jaxsd.training.train_loop` on 8 simulated CPU devices (data=4 x fsdp=2) and writes
the final params, step and data position to `--out`.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # Before jax is imported.
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

D_IN, D_HIDDEN, D_OUT = 16, 64, 8
MIN_SHARD_SIZE = 256  # So the toy's kernels (1024 and 512 elements) are sharded over fsdp.


def init_params(rng: jax.Array) -> dict:
  k1, k2 = jax.random.split(rng)
  return {
      "dense_0": {
          "kernel": jax.random.normal(k1, (D_IN, D_HIDDEN)) / np.sqrt(D_IN),
          "bias": jnp.zeros((D_HIDDEN,))
      },
      "dense_1": {
          "kernel": jax.random.normal(k2, (D_HIDDEN, D_OUT)) / np.sqrt(D_HIDDEN),
          "bias": jnp.zeros((D_OUT,))
      },
  }


def apply(params: dict, x: jax.Array) -> jax.Array:
  h = jnp.tanh(x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"])
  return h @ params["dense_1"]["kernel"] + params["dense_1"]["bias"]


def loss_fn(params, batch, rng, frozen=None):
  """MSE with input noise drawn from the step rng (so the rng handling is part of the result)."""
  del frozen
  x = batch["x"] + 0.01 * jax.random.normal(rng, batch["x"].shape)
  err = apply(params, x) - batch["y"]
  loss = jnp.mean(err**2)
  return loss, {"mae": jnp.mean(jnp.abs(err))}


def make_batch(index: int, batch_size: int, seed: int = 0) -> dict:
  """Batch `index` of a deterministic stream (numpy, host side)."""
  r = np.random.default_rng([seed, index])
  x = r.normal(size=(batch_size, D_IN)).astype(np.float32)
  w = np.random.default_rng(1234).normal(size=(D_IN, D_OUT)).astype(np.float32)
  return {"x": x, "y": np.sin(x @ w).astype(np.float32)}


class FakeIterator:
  """Stands in for a grain DatasetIterator: deterministic batches and get_state/set_state."""

  def __init__(self, batch_size: int = 16, seed: int = 0, sleep: float = 0.0, length=None):
    self.batch_size, self.seed, self.sleep, self.length = batch_size, seed, sleep, length
    self.index = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self.length is not None and self.index >= self.length:
      raise StopIteration
    if self.sleep:
      time.sleep(self.sleep)
    b = make_batch(self.index, self.batch_size, self.seed)
    self.index += 1
    return b

  def get_state(self) -> dict:
    return {"index": self.index, "blob": b"\x00grain\xff"}  # bytes, as some grain states are.

  def set_state(self, state: dict) -> None:
    assert state["blob"] == b"\x00grain\xff", state
    self.index = int(state["index"])


def flat(params) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def run_loop(workdir, data, total_steps, **kw):
  """`train_loop` on the toy task (data=4 x fsdp=2), with keyword overrides."""
  from jaxsd import training  # pylint: disable=g-import-not-at-top
  tx, sched = training.make_optimizer(dict(lr=1e-2, warmup_steps=2))
  args = dict(workdir=str(workdir), mesh=training.make_mesh(data=4, fsdp=2), init_params=init_params, loss_fn=loss_fn,
              tx=tx, data=data, total_steps=total_steps, lr_schedule=sched, ema_decay=0.99, log_every=2,
              checkpoint_every=3, min_shard_size=MIN_SHARD_SIZE, progress=False)
  args.update(kw)
  return training.train_loop(**args)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start_subprocess(workdir, out, steps: int, sleep: float, compile_cache=None):
  """Starts this file as a script (8 simulated devices, data=4 x fsdp=2)."""
  import subprocess  # pylint: disable=g-import-not-at-top

  import tests  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, XLA_FLAGS=tests.xla_flags(8), JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  if compile_cache:  # The later runs of a test skip compilation.
    env.update(JAX_COMPILATION_CACHE_DIR=str(compile_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  cmd = [
      sys.executable,
      os.path.abspath(__file__), "--workdir",
      str(workdir), "--out",
      str(out), "--steps",
      str(steps), "--checkpoint_every", "4", "--sleep",
      str(sleep)
  ]
  return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def committed_steps(workdir) -> list[int]:
  """Steps whose checkpoint folder is complete (orbax renames a finished save into place)."""
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(
      int(n) for n in os.listdir(d) if n.isdigit() and os.path.exists(os.path.join(d, n, "_CHECKPOINT_METADATA")))


def wait_for_checkpoint(proc, workdir, min_step: int, timeout: float = 120) -> int:
  t0 = time.time()
  while time.time() - t0 < timeout:
    steps = committed_steps(workdir)
    if steps and steps[-1] >= min_step:
      return steps[-1]
    if proc.poll() is not None:
      raise AssertionError(f"The run ended before a checkpoint:\n{proc.stdout.read()}")
    time.sleep(0.05)
  proc.kill()
  raise AssertionError(f"No checkpoint >= {min_step} within {timeout} s.")


def finish(proc, timeout: float = 180) -> str:
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out
  return out


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  from jaxsd import training  # pylint: disable=g-import-not-at-top

  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--checkpoint_every", type=int, default=4)
  p.add_argument("--sleep", type=float, default=0.0)
  p.add_argument("--fsdp", type=int, default=2)
  p.add_argument("--out", required=True)
  # tensorboardX imports torch when it is installed (~3 s); the in-process loop test covers it.
  p.add_argument("--tensorboard", action="store_true")
  a = p.parse_args(argv)
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("%(relativeCreated)6d %(levelname)s %(message)s"))
  logging.getLogger("jaxsd").addHandler(handler)
  logging.getLogger("jaxsd").setLevel(logging.INFO)
  logging.getLogger("jaxsd").propagate = False
  jax.config.update("jax_default_matmul_precision", "highest")

  mesh = training.make_mesh(data=-1, fsdp=a.fsdp)
  tx, sched = training.make_optimizer(dict(lr=1e-2, warmup_steps=5, schedule="cosine", total_steps=a.steps))
  data = FakeIterator(batch_size=16, sleep=a.sleep)
  res = training.train_loop(workdir=a.workdir, mesh=mesh, init_params=init_params, loss_fn=loss_fn, tx=tx, data=data,
                            total_steps=a.steps, lr_schedule=sched, ema_decay=0.99, log_every=2,
                            checkpoint_every=a.checkpoint_every, min_shard_size=MIN_SHARD_SIZE, progress=False,
                            tensorboard=a.tensorboard)
  out = {"params/" + k: v for k, v in flat(res.state.params).items()}
  out.update({"ema/" + k: v for k, v in flat(res.state.ema_params).items()})
  np.savez(a.out, step=res.step, data_index=data.index, preempted=res.preempted, source=res.source, **out)
  print(f"DONE step={res.step} preempted={res.preempted} source={res.source}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
