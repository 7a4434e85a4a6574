"""SchedulerConfig and the schedule arrays against diffusers' PyTorch schedulers (bit for bit)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.training_utils import compute_snr  # noqa: E402

from jaxsd.diffusion import schedules  # noqa: E402
from jaxsd.diffusion.schedules import SchedulerConfig  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json.
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False
}
SD21 = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None
}


def test_defaults_are_sd15():
  cfg = SchedulerConfig.from_dict(SD15)
  # The file names no spacing (PNDM's "leading" fills it) nor prediction type (epsilon everywhere).
  assert cfg.replace(defaulted=()) == SchedulerConfig(timestep_spacing="leading")
  assert {"timestep_spacing", "prediction_type"} <= set(cfg.defaulted)
  ref = diffusers.PNDMScheduler.from_config(SD15).config
  for k, v in cfg.to_dict().items():
    if k in ref:
      assert ref[k] == v, k
  # A scheduler swapped in by a pipeline keeps its own default spacing.
  assert cfg.for_class("EulerDiscreteScheduler").timestep_spacing == "linspace"
  assert ref.timestep_spacing == "leading"
  assert diffusers.EulerDiscreteScheduler.from_config(ref).config.timestep_spacing == "linspace"
  assert diffusers.DDIMScheduler.from_config(ref).config.timestep_spacing == "leading"
  saved = dict(ref)  # a config written by save_config names it, and then every scheduler uses it
  saved.pop("_use_default_values")
  assert diffusers.EulerDiscreteScheduler.from_config(saved).config.timestep_spacing == "leading"


def test_from_json_file_scheduler_dir_and_model_dir(tmp_path):
  (tmp_path / "scheduler").mkdir()
  path = tmp_path / "scheduler" / "scheduler_config.json"
  path.write_text(json.dumps(dict(SD21, some_future_key=3)))
  want = SchedulerConfig.from_dict(SD21)
  assert want.replace(defaulted=()) == SchedulerConfig(prediction_type="v_prediction", timestep_spacing="leading")
  for p in (path, tmp_path / "scheduler", tmp_path):
    assert SchedulerConfig.from_json(p) == want
  assert SchedulerConfig.from_dict(want.to_dict()).replace(defaulted=()) == want.replace(defaulted=())
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
    SchedulerConfig.from_json(tmp_path / "empty")


def test_trained_betas_become_a_tuple():
  cfg = SchedulerConfig.from_dict({"trained_betas": [0.1] * 1000})
  assert isinstance(cfg.trained_betas, tuple)
  hash(cfg)


@pytest.mark.parametrize("bad, match", [
    ({
        "beta_schedule": "sigmoid"
    }, "beta_schedule"),
    ({
        "prediction_type": "flow_prediction"
    }, "prediction_type"),
    ({
        "timestep_spacing": "uniform"
    }, "timestep_spacing"),
    ({
        "thresholding": True
    }, "thresholding"),
    ({
        "trained_betas": [0.1, 0.2]
    }, "trained_betas"),
])
def test_config_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    SchedulerConfig.from_dict(dict(SD15, **bad))


@pytest.mark.parametrize("kw", [
    {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012
    },
    {
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02
    },
    {
        "beta_schedule": "squaredcos_cap_v2"
    },
    {
        "beta_schedule": "linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "num_train_timesteps": 999
    },
    {
        "trained_betas": list(np.linspace(1e-4, 0.02, 1000))
    },
])
def test_alphas_cumprod_bit_exact(kw):
  cfg = SchedulerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})
  ref = diffusers.DDPMScheduler(**kw)
  np.testing.assert_array_equal(schedules.betas(cfg), ref.betas.numpy())
  np.testing.assert_array_equal(np.asarray(schedules.alphas_cumprod(cfg)), ref.alphas_cumprod.numpy())
  # sigma = sqrt((1 - a) / a): numpy's sqrt is correctly rounded, PyTorch's vectorised CPU sqrt
  # is 1 ulp off for ~20% of the values on this AVX-512 machine, so equal to 2 ulp.
  euler = diffusers.EulerDiscreteScheduler(**kw)
  np.testing.assert_allclose(
      schedules.train_sigmas(schedules.alphas_cumprod_np(cfg))[::-1],
      euler.sigmas.numpy()[:-1], rtol=2.4e-7, atol=0)


@pytest.mark.parametrize("kw", [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(beta_schedule="squaredcos_cap_v2"),
])
def test_zero_terminal_snr_betas_match_diffusers(kw):
  """rescale_betas_zero_snr=True (Lin et al. 2024) against diffusers' rescale_zero_terminal_snr: alpha_bar
  ends at exactly 0 and keeps its first value. Not bit-exact: torch's vectorised sqrt is 1 ulp off for
  some values (see test_alphas_cumprod_bit_exact). Measured: alpha_bar within 4.4e-6 relative (4.2e-7
  absolute); the betas, 1 - alpha_bar[t] / alpha_bar[t-1] of nearly equal numbers, within 2.9e-6 absolute."""
  cfg = SchedulerConfig(rescale_betas_zero_snr=True, **kw)
  ref = diffusers.DDPMScheduler(rescale_betas_zero_snr=True, **kw)
  ours = np.asarray(schedules.alphas_cumprod(cfg))
  np.testing.assert_allclose(ours, ref.alphas_cumprod.numpy(), rtol=1e-5, atol=0)
  np.testing.assert_allclose(schedules.betas(cfg), ref.betas.numpy(), rtol=0, atol=5e-6)
  assert ours[-1] == 0.0
  np.testing.assert_allclose(ours[0], schedules.alphas_cumprod_np(SchedulerConfig(**kw))[0], rtol=1e-6)
  assert np.all(np.diff(ours) < 0)


@pytest.mark.parametrize("spacing", [None, "leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 7, 10, 50])
def test_inference_timesteps(spacing, n):
  d = dict(SD15) if spacing is None else dict(SD15, timestep_spacing=spacing)
  cfg = SchedulerConfig.from_dict(d)
  for cls, fn in [(diffusers.DDIMScheduler, schedules.discrete_timesteps),
                  (diffusers.DDPMScheduler, schedules.discrete_timesteps),
                  (diffusers.EulerDiscreteScheduler, schedules.sigma_timesteps),
                  (diffusers.DPMSolverMultistepScheduler, schedules.dpm_timesteps)]:
    ref = cls.from_config(d)
    ref.set_timesteps(n)
    got = fn(cfg.for_class(cls.__name__), n)  # the config as that class reads it (make_schedule's)
    assert got.dtype == ref.timesteps.numpy().dtype, cls.__name__
    np.testing.assert_array_equal(got, ref.timesteps.numpy(), err_msg=cls.__name__)


@pytest.mark.parametrize("n", [0, -1, 1001, 2.5])
def test_inference_timesteps_bad_count(n):
  with pytest.raises(ValueError, match="num_steps"):
    schedules.discrete_timesteps(SchedulerConfig(), n)


def test_karras_sigmas_and_sigma_to_t():
  ref = diffusers.EulerDiscreteScheduler.from_config(dict(SD15, use_karras_sigmas=True, timestep_spacing="linspace"))
  ref.set_timesteps(12)
  train = schedules.train_sigmas(schedules.alphas_cumprod_np(SchedulerConfig()))
  sig = schedules.karras_sigmas(float(train[0]), float(train[-1]), 12)
  np.testing.assert_allclose(sig.astype(np.float32), ref.sigmas.numpy()[:-1], rtol=2.4e-7, atol=0)
  np.testing.assert_allclose(
      schedules.sigma_to_t(sig, np.log(train)).astype(np.float32), ref.timesteps.numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("cfg_dict", [SD15, SD21, dict(SD15, beta_schedule="squaredcos_cap_v2")])
def test_add_noise_velocity_snr(cfg_dict):
  cfg = SchedulerConfig.from_dict(cfg_dict)
  ref = diffusers.DDPMScheduler.from_config(cfg_dict)
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((5, 4, 6, 6)).astype(np.float32)
  eps = rng.standard_normal((5, 4, 6, 6)).astype(np.float32)
  t = np.array([0, 1, 250, 998, 999])
  tt = torch.from_numpy(t)
  ac = schedules.alphas_cumprod(cfg)
  f = jax.jit(lambda x0, eps, t:
              (schedules.add_noise(ac, x0, eps, t), schedules.velocity(ac, x0, eps, t), schedules.snr(ac, t)))
  noisy, v, s = f(x0, eps, t)
  np.testing.assert_allclose(noisy,
                             ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), tt).numpy(), rtol=0, atol=1e-6)
  np.testing.assert_allclose(v,
                             ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(eps), tt).numpy(), rtol=0,
                             atol=1e-6)
  np.testing.assert_allclose(s, compute_snr(ref, tt).numpy(), rtol=2e-6)
  # Scalar t broadcasts; a bf16 x0 keeps fp32 schedule arithmetic and comes back as bf16.
  np.testing.assert_array_equal(schedules.add_noise(ac, x0, eps, 250),
                                schedules.add_noise(ac, x0, eps, np.full(5, 250)))
  y = schedules.add_noise(ac, jnp.asarray(x0, jnp.bfloat16), jnp.asarray(eps, jnp.bfloat16), t)
  assert y.dtype == jnp.bfloat16
  want = schedules.add_noise(ac, np.asarray(jnp.asarray(x0, jnp.bfloat16), np.float32),
                             np.asarray(jnp.asarray(eps, jnp.bfloat16), np.float32), t)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want.astype(jnp.bfloat16), np.float32))


def test_add_noise_rejects_t_of_higher_rank():
  ac = schedules.alphas_cumprod(SchedulerConfig())
  with pytest.raises(ValueError, match="t has shape"):
    schedules.add_noise(ac, jnp.zeros((2,)), jnp.zeros((2,)), jnp.zeros((2, 2), jnp.int32))


@pytest.mark.parametrize("class_name", sorted(schedules.DIFFUSERS_DEFAULTS))
def test_keys_left_out_take_the_diffusers_class_defaults(class_name):
  # What a config that leaves a key out means is the default of the scheduler class reading it, whatever the file's.
  cls = getattr(diffusers, class_name)
  # (a list default, UniPC's disable_corrector=[], is a tuple here: configs stay hashable)
  sig = {
      k: tuple(p.default) if isinstance(p.default, list) else p.default
      for k, p in inspect.signature(cls.__init__).parameters.items()
      if k != "self"
  }
  ours = [f.name for f in dataclasses.fields(SchedulerConfig) if f.name in sig]
  edm = {"sigma_min", "sigma_max", "sigma_data", "sigma_schedule", "rho"}  # EDM's noise schedule: no betas
  common = edm if class_name in schedules.EDM_CLASSES else {"beta_start", "beta_schedule", "steps_offset"}
  if class_name == "DPMSolverSinglestepScheduler":  # (its timesteps are always "linspace": no steps_offset)
    common -= {"steps_offset"}
  assert {"num_train_timesteps", "prediction_type"} | common <= set(ours)
  assert sorted(schedules.DIFFUSERS_DEFAULTS[class_name]) == sorted(ours)
  for source in ({}, {"_class_name": class_name}, {"_class_name": "PNDMScheduler"}, {"_class_name": "DDIMScheduler"}):
    cfg = SchedulerConfig.from_dict(source).for_class(class_name)
    got = {k: getattr(cfg, k) for k in ours}
    assert got == {k: sig[k] for k in ours}, source
  # diffusers itself: a class built from an empty config, and from another class's config that left keys out.
  ref = cls.from_config(diffusers.PNDMScheduler.from_config({}).config).config
  assert {k: tuple(ref[k]) if isinstance(ref[k], list) else ref[k] for k in ours} == {k: sig[k] for k in ours}


def test_sampler_rows_name_their_diffusers_class():
  from jaxsd.diffusion import samplers

  for name in samplers.SAMPLERS:
    assert samplers.get(name).scheduler_class in schedules.DIFFUSERS_DEFAULTS, name


def test_file_values_win_and_diffusers_config_dicts_are_read():
  cfg = SchedulerConfig.from_dict({"_class_name": "DDIMScheduler", "steps_offset": 1})
  assert cfg.for_class("PNDMScheduler").steps_offset == 1 and not cfg.for_class("PNDMScheduler").skip_prk_steps
  assert cfg.clip_sample and cfg.set_alpha_to_one  # DDIM's own defaults
  # A live diffusers config lists the keys its class filled in `_use_default_values`.
  live = dict(diffusers.DDIMScheduler.from_config({"steps_offset": 1}).config)
  assert SchedulerConfig.from_dict(live).for_class("PNDMScheduler") == cfg.for_class("PNDMScheduler")


def _other_value(v):
  if v == "zero":  # final_sigmas_type: the other valid value
    return "sigma_min"
  if isinstance(v, bool):
    return not v
  if v is None or (isinstance(v, float) and math.isinf(v)):
    return 0.5
  return v + 1 if isinstance(v, (int, float)) else "something_else"


@pytest.mark.parametrize("class_name", sorted(schedules.UNIMPLEMENTED))
def test_settings_no_sampler_implements_are_refused(class_name):
  from jaxsd.diffusion import samplers

  cls = getattr(diffusers, class_name)
  sig = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
  fixed = schedules.UNIMPLEMENTED[class_name]
  assert {k: sig[k] for k in fixed} == fixed  # what every sampler of the class runs: diffusers' defaults
  sampler = samplers.SAMPLER_OF[class_name]
  edm = class_name in schedules.EDM_CLASSES  # (SD 1.5's is no EDM model: EDM samplers refuse it)
  base = {"_class_name": class_name} if edm else SD15
  # A config diffusers saved (every key at its default) runs; so does SD 1.5's with the defaults named.
  samplers.make_schedule(SchedulerConfig.from_dict(dict(cls.from_config(base).config)), sampler, 10)
  samplers.make_schedule(SchedulerConfig.from_dict(dict(base, **fixed)), sampler, 10)
  for key, value in fixed.items():
    cfg = SchedulerConfig.from_dict(dict(base, _class_name=class_name, **{key: _other_value(value)}))
    with pytest.raises(ValueError, match=f"{sampler} with {key}=.* is not implemented"):
      samplers.make_schedule(cfg, sampler, 10)
    if not edm:
      samplers.make_schedule(cfg, "ddim", 10)  # DDIM does not read it


def test_edm_configs_are_recognised():
  """SchedulerConfig.edm: sigma_data is set, which an EDM scheduler's file always is (its class default fills it
  in), a live EDM `.config` too (it has no _class_name), and no other class's file."""
  edm = [
      dict(_class_name="EDMEulerScheduler"),
      dict(_class_name="EDMDPMSolverMultistepScheduler", rho=5.0),
      dict(diffusers.EDMEulerScheduler.from_config({}).config),
      dict(diffusers.EDMDPMSolverMultistepScheduler(sigma_data=1.0).config),
  ]
  for d in edm:
    cfg = SchedulerConfig.from_dict(d)
    assert cfg.edm and cfg.sigma_min == 0.002 and cfg.sigma_max == 80.0
    assert cfg.sigma_data == d.get("sigma_data", 0.5)
  other = [
      SD15,
      SD21,
      {},
      dict(_class_name="EulerDiscreteScheduler", sigma_min=0.1, sigma_max=10.0),
      dict(diffusers.EulerDiscreteScheduler.from_config(SD15).config),
  ]
  for d in other:
    assert not SchedulerConfig.from_dict(d).edm
  assert not SchedulerConfig().edm
  # A non-EDM config keeps its sigma_data None when an EDM class reads it (samplers refuse that pairing first).
  assert SchedulerConfig.from_dict(SD15).for_class("EDMEulerScheduler").sigma_data == 0.5


@pytest.mark.parametrize("n", [1, 2, 7, 10, 30, 100])
@pytest.mark.parametrize("sigma_schedule", ["karras", "exponential"])
@pytest.mark.parametrize("class_name", ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"])
def test_edm_sigmas_bit_exact(class_name, sigma_schedule, n):
  d = dict(_class_name=class_name, sigma_schedule=sigma_schedule, sigma_max=120.0, rho=6.0)
  ref = getattr(diffusers, class_name).from_config(d)
  ref.set_timesteps(n)
  got = schedules.edm_sigmas(SchedulerConfig.from_dict(d), n, float32_ramp=class_name != "EDMEulerScheduler")
  assert got.dtype == np.float32
  # torch's float32 exp and pow are not correctly rounded: equal but for a few values an ulp apart.
  want = ref.sigmas.numpy()[:-1]
  np.testing.assert_allclose(got, want, rtol=1.2e-7, atol=0)
  assert np.mean(got == want) >= 0.95


@pytest.mark.parametrize("bad, match", [({
    "sigma_schedule": "linear"
}, "sigma_schedule"), ({
    "final_sigmas_type": "denoise_to_zero"
}, "final_sigmas_type"), ({
    "sigma_data": 0.0
}, "sigma_data > 0"), ({
    "sigma_min": 90.0
}, "0 < sigma_min < sigma_max")])
def test_edm_config_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    SchedulerConfig.from_dict(dict({"_class_name": "EDMEulerScheduler"}, **bad))
