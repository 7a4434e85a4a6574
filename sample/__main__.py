"""python -m sample: text-to-image across every local accelerator. Flags only; the work is in jaxsd.generate."""

from __future__ import annotations

import argparse
import sys


def parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m sample", description=__doc__)
  p.add_argument("--model", required=True, help="diffusers Stable Diffusion folder, or a training workdir")
  p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  p.add_argument("--prompts-file", help="a text file with one prompt per line")
  p.add_argument("--negative-prompt", default="")
  p.add_argument("--num-images", type=int, default=1, help="images per prompt")
  p.add_argument("--steps", type=int, default=25)
  p.add_argument("--sampler", default="dpmpp_2m")
  p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (<= 1: off)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--height", type=int, default=None, help="default: the model's native size")
  p.add_argument("--width", type=int, default=None)
  p.add_argument("--batch-per-device", type=int, default=1)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  p.add_argument("--out", default="samples")
  p.add_argument("--benchmark", action="store_true", help="print one JSON line of timings")
  p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)")
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse(argv)
  from jaxsd import generate

  return generate.main(args)


if __name__ == "__main__":
  sys.exit(main())
