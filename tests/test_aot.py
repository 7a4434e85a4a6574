"""jaxsd.aot: text-to-image programs saved with jax.export and called without tracing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import jaxsd
from jaxsd import aot
import tests
from tests import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle on the left", "a small blue square"]
CALL = dict(height=16, width=16, steps=6, sampler="dpmpp_2m", guidance_scale=5.0, seed=3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  folder = reference.make_tiny_sd_folder(str(tmp_path_factory.mktemp("sd")))
  pipe = jaxsd.StableDiffusion.from_pretrained(folder)
  programs = str(tmp_path_factory.mktemp("programs"))
  # Saved at another guidance scale and no seed: both are arguments of the program.
  aot.save_program(pipe, programs, batch=2, height=16, width=16, steps=6, sampler="dpmpp_2m", guidance_scale=2.0)
  return folder, programs, pipe


def test_a_new_process_runs_the_saved_program_without_tracing(saved, tmp_path):
  """A fresh process loads the model and the saved program and calls `pipe(...)` as usual: the images
  equal, to the bit, the in-process traced call's, and the pipeline traced nothing (its jit cache stays
  empty). Fails if `_run` ignores the loaded program (the cache then holds the traced program)."""
  folder, programs, pipe = saved
  want = pipe(PROMPTS, **CALL)
  out = str(tmp_path / "images.npy")
  script = f"""
import json, numpy as np, jaxsd
from jaxsd import aot
pipe = jaxsd.StableDiffusion.from_pretrained({folder!r})
names = aot.load_programs(pipe, {programs!r})
np.save({out!r}, pipe({PROMPTS!r}, **{CALL!r}))
print(json.dumps({{"names": names, "traced": [str(k) for k in pipe._compiled]}}))
"""
  env = dict(os.environ, XLA_FLAGS=tests.xla_flags(1), JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-2000:]
  facts = json.loads(res.stdout.strip().splitlines()[-1])
  assert facts == {"names": ["text-b2-16x16-dpmpp_2m-6-guided-np"], "traced": []}
  got = np.load(out)
  assert got.dtype == np.uint8 and got.shape == want.shape == (2, 16, 16, 3) and got.std() > 5
  np.testing.assert_array_equal(got, want)


def test_other_settings_trace_as_before(saved):
  folder, programs, _ = saved
  pipe = jaxsd.StableDiffusion.from_pretrained(folder)
  aot.load_programs(pipe, programs)
  ref = jaxsd.StableDiffusion.from_pretrained(folder)
  for change in (dict(steps=5), dict(guidance_scale=1.0), dict(height=24, width=24)):
    np.testing.assert_array_equal(pipe(PROMPTS, **{**CALL, **change}), ref(PROMPTS, **{**CALL, **change}))
  assert len(pipe._compiled) == 2  # the guided and unguided programs were traced for these calls


def test_programs_of_another_model_or_none_are_refused(saved, tmp_path):
  folder, programs, _ = saved
  bf16 = jaxsd.StableDiffusion.from_pretrained(folder, jnp.bfloat16)
  with pytest.raises(ValueError, match="other parameter shapes or dtypes"):
    aot.load_programs(bf16, programs)
  cuda = str(tmp_path / "cuda")  # lowered for another platform than this CPU's
  aot.save_program(bf16, cuda, batch=1, height=16, width=16, steps=2, sampler="ddim", platforms=("cuda",))
  with pytest.raises(ValueError, match="saved for \\['cuda'\\], not this cpu backend"):
    aot.load_programs(bf16, cuda)
  with pytest.raises(FileNotFoundError, match="no \\*.jaxexport programs"):
    aot.load_programs(bf16, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="not a folder"):
    aot.load_programs(bf16, str(tmp_path / "missing"))


def test_programs_of_another_schedule_are_refused_or_not_used(saved):
  """The schedule, clip_skip and the networks' configs and dtypes are inside the program, not its arguments: a
  program saved from an epsilon model ran for a v-prediction model of the same shapes, and one loaded before
  `scheduler_config.replace(...)` kept the old schedule, both silently (images 146 and 27 levels off)."""
  folder, programs, _ = saved
  v_pred = jaxsd.StableDiffusion.from_pretrained(folder)
  v_pred.scheduler_config = v_pred.scheduler_config.replace(prediction_type="v_prediction")
  with pytest.raises(ValueError, match="another noise schedule, network configs, dtypes or clip_skip"):
    aot.load_programs(v_pred, programs)
  pipe = jaxsd.StableDiffusion.from_pretrained(folder)
  aot.load_programs(pipe, programs)
  pipe.scheduler_config = pipe.scheduler_config.replace(timestep_spacing="trailing")
  ref = jaxsd.StableDiffusion.from_pretrained(folder)
  ref.scheduler_config = pipe.scheduler_config
  np.testing.assert_array_equal(pipe(PROMPTS, **CALL), ref(PROMPTS, **CALL))
  assert len(pipe._compiled) == 1  # traced, not the saved program
