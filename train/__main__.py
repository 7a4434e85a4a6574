"""python -m train: train Stable Diffusion (clip -> vae -> unet) from an ml_collections config.

  python -m train --workdir DIR [--config train/configs/default.py] [--config.unet.steps=4000 ...]

Flags only; the work is jaxsd.training.run.train_and_evaluate. Rerunning the same command resumes.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", _DEFAULT, "Training config file (a get_config() Python file).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", "workdir", "Where checkpoints, metrics, the model and samples go.")
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host TPU/GPU).")
  flags.DEFINE_bool(
      "benchmark", False, "Time the U-Net train step (config.benchmark_steps, default 10) and "
      "print one JSON line instead of training.")


def main(argv) -> int:
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "jax._src", "tensorflow_datasets", "grain", "httpx"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  import jax

  from jaxsd.compilation_cache import enable_compilation_cache
  from jaxsd.training import run

  cfg = flags.FLAGS.config
  if flags.FLAGS.benchmark:
    with cfg.unlocked():
      cfg.benchmark_steps = cfg.benchmark_steps or 10
  try:
    if flags.FLAGS.distributed:
      jax.distributed.initialize()
    enable_compilation_cache()
    result = run.train_and_evaluate(cfg, flags.FLAGS.workdir)
  except run.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except run.Preempted:
    print("preempted: a checkpoint was saved; rerun the same command to resume.", file=sys.stderr)
    return 0
  if cfg.benchmark_steps:
    print(json.dumps(result))
  else:
    print(f"done: results in {os.path.abspath(flags.FLAGS.workdir)}/summary.json", file=sys.stderr)
  return 0


def _parse_flags(argv) -> None:
  """Parses flags; an unknown config key or a bad value is a one-line error, not a traceback."""
  try:
    _define_flags()  # ml_collections reads --config.* overrides already while defining the flag
    flags.FLAGS(argv)
    flags.FLAGS.config.to_dict()  # a config file that failed to load raises only when used
  except Exception as e:  # pylint: disable=broad-except  (absl/ml_collections raise several kinds)
    msg = " ".join(str(a) for a in e.args).strip("'\"").replace("\\n", " ").replace("\n", " ").replace("\\'",
                                                                                                       "'") or repr(e)
    print(
        f"error: bad flag ({type(e).__name__}): {msg}. Config keys are those of the config file "
        "(see train/configs/default.py); override them as --config.section.key=value.", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  _parse_flags(sys.argv)
  app.run(lambda argv: sys.exit(main(argv)), argv=sys.argv[:1])
