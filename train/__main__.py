"""python -m train: train Stable Diffusion (clip -> vae -> unet) from an ml_collections config.

  python -m train --workdir DIR [--config train/configs/default.py] [--config.unet.steps=4000 ...]

Flags only; the work is jaxsd.training.run.train_and_evaluate. Rerunning the same command resumes.
Bad input (an unknown config key, a value the library refuses) exits 2 with one line on stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")


def parse(argv: list[str]) -> flags.FlagValues:
  """The flags of `argv` (argv[0] is the program), in a FlagValues of their own; raises for bad ones."""
  fv = flags.FlagValues()
  # ml_collections reads --config.* overrides from `sys_argv` already while defining the flag.
  config_flags.DEFINE_config_file("config", _DEFAULT, "Training config file (a get_config() Python file).",
                                  flag_values=fv, lock_config=True, sys_argv=list(argv))
  flags.DEFINE_string("workdir", "workdir", "Where checkpoints, metrics, the model and samples go.", flag_values=fv)
  flags.DEFINE_bool(
      "distributed", False, "Multi-host: call jax.distributed.initialize() first (cluster auto-detection, or "
      "the three flags below).", flag_values=fv)
  flags.DEFINE_string(
      "coordinator_address", None, "With --distributed: host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS "
      "or auto-detected).", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "With --distributed: how many processes.", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "With --distributed: this process, 0 .. num_processes - 1.", flag_values=fv)
  flags.DEFINE_bool(
      "benchmark", False, "Time the U-Net train step (config.benchmark_steps, default 10) and "
      "print one JSON line instead of training.", flag_values=fv)
  fv(list(argv))
  fv.config.to_dict()  # a config file that failed to load raises only when used
  return fv


def _one_line(e: BaseException) -> str:
  msg = " ".join(str(a) for a in e.args).strip("'\"").replace("\\n", " ").replace("\\'", "'") or repr(e)
  head, tb, rest = msg.partition("Traceback (most recent call last):")
  if tb:  # ml_collections puts a config file's whole traceback in its error: its last line is the reason
    msg = head + rest.strip().splitlines()[-1]
  return " ".join(msg.split())


def main(argv: list[str] | None = None) -> int:
  """Runs the command line `argv` (default sys.argv); returns the exit status (2: bad input, one line on stderr)."""
  argv = sys.argv if argv is None else argv
  try:
    fv = parse(argv)
  except Exception as e:  # pylint: disable=broad-except  (absl/ml_collections raise several kinds)
    print(
        f"error: bad flag ({type(e).__name__}): {_one_line(e)}. Config keys are those of the config file "
        "(see train/configs/default.py); override them as --config.section.key=value.", file=sys.stderr)
    return 2
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "jax._src", "tensorflow_datasets", "grain", "httpx"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  import jax

  from jaxsd.compilation_cache import enable_compilation_cache
  from jaxsd.training import checkpoint, run, run_config

  cfg = fv.config
  if fv.benchmark:
    with cfg.unlocked():
      cfg.benchmark_steps = cfg.benchmark_steps or 10
  try:
    if fv.distributed:
      jax.distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
    elif (fv.coordinator_address, fv.num_processes, fv.process_id) != (None, None, None):
      raise run_config.ConfigError("--coordinator_address, --num_processes and --process_id need --distributed.")
    run_config.resolve_init(cfg)  # a Hub id: its folder in the Hugging Face cache
    run_config.check_config(cfg, jax.device_count())  # before the compilation cache or anything else is touched
    enable_compilation_cache()
    result = run.train_and_evaluate(cfg, fv.workdir)
  except (run_config.ConfigError, checkpoint.CheckpointError) as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 2
  except run.Preempted:
    print("preempted: a checkpoint was saved; rerun the same command to resume.", file=sys.stderr)
    return 0
  if cfg.benchmark_steps:
    print(json.dumps(result))
  else:
    print(f"done: results in {os.path.abspath(fv.workdir)}/summary.json", file=sys.stderr)
  return 0


def cli() -> None:
  """The `jaxsd-train` console script (absl's app.run sets up its logging; the flags are main's)."""
  argv = list(sys.argv)
  app.run(lambda _: sys.exit(main(argv)), argv=argv[:1])


if __name__ == "__main__":
  cli()
