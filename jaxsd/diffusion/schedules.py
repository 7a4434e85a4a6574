"""Noise schedules of DDPM (Ho et al., 2020) as diffusers' schedulers define them.

`SchedulerConfig` reads a diffusers `scheduler/scheduler_config.json`. The schedule itself
(betas, alphas_cumprod, sigmas, inference timesteps) is built once in numpy with the same
float32 arithmetic as diffusers' PyTorch schedulers, so the arrays agree bit for bit; the
training helpers at the bottom are jittable jnp functions of `alphas_cumprod`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd.config import ConfigBase, read_json_object

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SIGMA_SCHEDULES = ("karras", "exponential")  # EDM's sigma_schedule
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")

# What a scheduler_config.json that leaves a key out means: each diffusers scheduler class's own default
# (`inspect.signature(diffusers.<Class>.__init__)`, diffusers 0.42; tests/diffusion/test_schedules.py checks
# them), for the keys SchedulerConfig reads. They are not SD's values: beta_start=0.00085 with
# "scaled_linear", steps_offset=1 and skip_prk_steps=true are in SD's files, not in diffusers' defaults.
_COMMON = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
               prediction_type="epsilon", steps_offset=0)
_NO_OFFSET = {k: v for k, v in _COMMON.items() if k != "steps_offset"}
_EDM = dict(num_train_timesteps=1000, prediction_type="epsilon", sigma_min=0.002, sigma_max=80.0, sigma_data=0.5,
            sigma_schedule="karras", rho=7.0)
DIFFUSERS_DEFAULTS = {
    "DDIMScheduler":
        dict(_COMMON, clip_sample=True, set_alpha_to_one=True, thresholding=False, clip_sample_range=1.0,
             timestep_spacing="leading", rescale_betas_zero_snr=False),
    "PNDMScheduler":
        dict(_COMMON, skip_prk_steps=False, set_alpha_to_one=False, timestep_spacing="leading"),
    "DDPMScheduler":
        dict(_COMMON, variance_type="fixed_small", clip_sample=True, thresholding=False, clip_sample_range=1.0,
             timestep_spacing="leading", rescale_betas_zero_snr=False),
    "EulerDiscreteScheduler":
        dict(_COMMON, use_karras_sigmas=False, timestep_spacing="linspace", rescale_betas_zero_snr=False,
             sigma_min=None, sigma_max=None, final_sigmas_type="zero"),
    "EulerAncestralDiscreteScheduler":
        dict(_COMMON, timestep_spacing="linspace", rescale_betas_zero_snr=False),
    # Not _COMMON's betas: Heun's own defaults are SD's values, but linear.
    "HeunDiscreteScheduler":
        dict(_COMMON, beta_start=0.00085, beta_end=0.012, use_karras_sigmas=False, clip_sample=False,
             clip_sample_range=1.0, timestep_spacing="linspace"),
    "LMSDiscreteScheduler":
        dict(_COMMON, use_karras_sigmas=False, timestep_spacing="linspace"),
    "DPMSolverMultistepScheduler":
        dict(_COMMON, thresholding=False, use_karras_sigmas=False, variance_type=None, timestep_spacing="linspace",
             rescale_betas_zero_snr=False, lower_order_final=True, euler_at_final=False, final_sigmas_type="zero"),
    "UniPCMultistepScheduler":
        dict(_COMMON, thresholding=False, use_karras_sigmas=False, timestep_spacing="linspace",
             rescale_betas_zero_snr=False, lower_order_final=True, final_sigmas_type="zero", sigma_min=None,
             sigma_max=None, disable_corrector=()),
    # EDM (Karras et al. 2022): no betas; a sigma schedule of its own, and the preconditioning of sigma_data.
    "EDMEulerScheduler":
        dict(_EDM, final_sigmas_type="zero"),
    "EDMDPMSolverMultistepScheduler":
        dict(_EDM, thresholding=False, lower_order_final=True, euler_at_final=False, final_sigmas_type="zero"),
    # Not _COMMON's betas: LCM's own defaults are SD's.
    "LCMScheduler":
        dict(_COMMON, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", original_inference_steps=50,
             clip_sample=False, clip_sample_range=1.0, set_alpha_to_one=True, thresholding=False,
             timestep_spacing="leading", timestep_scaling=10.0, rescale_betas_zero_snr=False),
    "TCDScheduler":
        dict(_COMMON, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", original_inference_steps=50,
             clip_sample=False, clip_sample_range=1.0, set_alpha_to_one=True, thresholding=False,
             timestep_spacing="leading", timestep_scaling=10.0, rescale_betas_zero_snr=False),
    # Not _COMMON's betas: KDPM2's own are SD's values, but linear.
    "KDPM2DiscreteScheduler":
        dict(_COMMON, beta_start=0.00085, beta_end=0.012, use_karras_sigmas=False, timestep_spacing="linspace"),
    "KDPM2AncestralDiscreteScheduler":
        dict(_COMMON, beta_start=0.00085, beta_end=0.012, use_karras_sigmas=False, timestep_spacing="linspace"),
    # No timestep_spacing nor steps_offset: its timesteps are always "linspace".
    "DPMSolverSinglestepScheduler":
        dict(_NO_OFFSET, thresholding=False, lower_order_final=False, use_karras_sigmas=False, final_sigmas_type="zero",
             variance_type=None),
    "DEISMultistepScheduler":
        dict(_COMMON, thresholding=False, lower_order_final=True, use_karras_sigmas=False, timestep_spacing="linspace"),
    # Not _COMMON's betas: DPMSolverSDE's own are SD's values, but linear (as KDPM2's).
    "DPMSolverSDEScheduler":
        dict(_COMMON, beta_start=0.00085, beta_end=0.012, use_karras_sigmas=False, timestep_spacing="linspace"),
}
# The classes whose models have EDM preconditioning (their `sigma_data` marks a config as EDM: SchedulerConfig.edm).
EDM_CLASSES = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
# Keys of those classes that no sampler here implements beyond their default (the value each sampler
# runs with, diffusers' default): a config that names another value is refused, not run as if it did not.
_PLAIN_SIGMAS = dict(use_exponential_sigmas=False, use_beta_sigmas=False)
UNIMPLEMENTED = {
    "EulerDiscreteScheduler":
        dict(_PLAIN_SIGMAS, interpolation_type="linear", sigma_min=None, sigma_max=None, timestep_type="discrete",
             final_sigmas_type="zero"),
    "HeunDiscreteScheduler":
        _PLAIN_SIGMAS,
    "LMSDiscreteScheduler":
        _PLAIN_SIGMAS,
    # lower_order_final and euler_at_final are not listed: with final_sigmas_type="zero" diffusers takes the last
    # step at first order whatever they say, and at solver_order=2 nothing else reads them.
    "DPMSolverMultistepScheduler":
        dict(_PLAIN_SIGMAS, solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint", use_lu_lambdas=False,
             use_flow_sigmas=False, final_sigmas_type="zero", lambda_min_clipped=-math.inf, use_dynamic_shifting=False),
    # (lower_order_final, euler_at_final and final_sigmas_type are read: SchedulerConfig fields.)
    "EDMDPMSolverMultistepScheduler":
        dict(solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint"),
    "KDPM2DiscreteScheduler":
        _PLAIN_SIGMAS,
    "KDPM2AncestralDiscreteScheduler":
        _PLAIN_SIGMAS,
    "DPMSolverSDEScheduler":
        _PLAIN_SIGMAS,
    # (lower_order_final and final_sigmas_type are read: SchedulerConfig fields.)
    "DPMSolverSinglestepScheduler":
        dict(_PLAIN_SIGMAS, solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint", use_flow_sigmas=False,
             lambda_min_clipped=-math.inf, use_dynamic_shifting=False),
    "DEISMultistepScheduler":
        dict(_PLAIN_SIGMAS, solver_order=2, algorithm_type="deis", solver_type="logrho", use_flow_sigmas=False,
             use_dynamic_shifting=False),
    "UniPCMultistepScheduler":
        dict(_PLAIN_SIGMAS, solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
             final_sigmas_type="zero", sigma_min=None, sigma_max=None, use_flow_sigmas=False,
             use_dynamic_shifting=False),
}
# Values a scheduler class's __init__ maps to its own when built from another class's config (diffusers'
# DPMSolverMultistepScheduler.from_config of a UniPC or DEIS config): compared after mapping.
_REMAPPED = {
    "DPMSolverMultistepScheduler": {
        "solver_type": {
            "logrho": "midpoint",
            "bh1": "midpoint",
            "bh2": "midpoint"
        },
        "algorithm_type": {
            "deis": "dpmsolver++"
        },
    },
}
_REMAPPED["EDMDPMSolverMultistepScheduler"] = _REMAPPED["DPMSolverMultistepScheduler"]
_REMAPPED["DPMSolverSinglestepScheduler"] = _REMAPPED["DPMSolverMultistepScheduler"]
_REMAPPED["DEISMultistepScheduler"] = {
    "solver_type": dict.fromkeys(("midpoint", "heun", "bh1", "bh2"), "logrho"),
    "algorithm_type": dict.fromkeys(("dpmsolver", "dpmsolver++"), "deis"),
}
_REMAPPED["UniPCMultistepScheduler"] = {"solver_type": {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}}
_UNIMPLEMENTED_KEYS = frozenset(k for keys in UNIMPLEMENTED.values() for k in keys)
# A file without a known `_class_name`: diffusers' training scripts read it as a DDPMScheduler.
_FALLBACK_CLASS = "DDPMScheduler"


@dataclasses.dataclass(frozen=True)
class SchedulerConfig(ConfigBase):
  """The noise schedule of a model, from its diffusers `scheduler_config.json`.

  The dataclass defaults are Stable Diffusion 1.5's PNDM config (what `SchedulerConfig()` means in code).
  A file read with `from_dict` / `from_json` means what it means to diffusers instead: a key it leaves
  out takes the default of the file's `_class_name` (`DIFFUSERS_DEFAULTS`), is listed in `defaulted`,
  and takes the default of another scheduler class when a sampler of that class uses the config
  (`for_class`; diffusers' `from_config` does the same through its `_use_default_values`). Keys of
  the file that no sampler here reads (`solver_order`, ...) are ignored.
  """

  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"  # SD: linear in sqrt(beta), Rombach et al. (2022).
  trained_betas: tuple[float, ...] | None = None
  prediction_type: str = "epsilon"  # SD 2.x 768px models: "v_prediction".
  # None: each sampler's diffusers default ("leading" for DDIM / PNDM / DDPM, "linspace" for the
  # others). SD configs name no spacing, and diffusers' `from_config` keeps a default it did not
  # read from the file out of the next scheduler it builds, so a swapped-in scheduler uses its own.
  timestep_spacing: str | None = None
  steps_offset: int = 1  # "leading" timesteps are 1, 21, ..., 981 rather than 0, ..., 980.
  set_alpha_to_one: bool = False  # DDIM / PNDM: alpha_prod before t=0 is alphas_cumprod[0].
  clip_sample: bool = False  # DDIM / DDPM / Heun clip predicted x0 to +-clip_sample_range.
  clip_sample_range: float = 1.0
  use_karras_sigmas: bool = False  # Euler, Heun, LMS, DPM++: Karras et al. (2022) eq. 5.
  skip_prk_steps: bool = True  # PNDM: PLMS from the first step (SD), no Runge-Kutta warm-up.
  variance_type: str = "fixed_small"  # DDPM: the posterior variance, Ho et al. eq. 7.
  thresholding: bool = False  # Dynamic thresholding (Imagen): not for latent diffusion.
  # Lin et al. (2024): betas rescaled so that alpha_bar at the last timestep is 0 (pure noise), for
  # v-prediction models sampled with "trailing" spacing. Read by DDIM, DDPM, Euler (a), DPM-Solver, UniPC, LCM.
  rescale_betas_zero_snr: bool = False
  # EDM (Karras et al. 2022; EDMEulerScheduler, EDMDPMSolverMultistepScheduler): latents x = x0 + sigma * eps, and
  # the network F denoises as c_skip x + c_out F(c_in x, log(sigma) / 4) with the data's standard deviation
  # sigma_data. Set exactly for models trained so (None otherwise): see `edm`.
  sigma_data: float | None = None
  sigma_min: float | None = None  # EDM: the noise levels run from sigma_max down to sigma_min
  sigma_max: float | None = None
  sigma_schedule: str = "karras"  # EDM: "karras" (their eq. 5, with rho) or "exponential" (log-linear; CosXL)
  rho: float = 7.0
  final_sigmas_type: str = "zero"  # EDM: the last step goes to sigma 0, or to sigma_min ("sigma_min")
  lower_order_final: bool = True  # EDM DPM++: a first-order last step below 15 steps (UniPC: only True)
  euler_at_final: bool = False  # EDM DPM++: a first-order last step whatever the step count
  # LCM (Luo et al. 2023): the distillation ran on original_inference_steps evenly skipped timesteps (the
  # sampler's are a subset of them); its boundary-condition scalings are taken at timestep_scaling * t.
  original_inference_steps: int = 50
  timestep_scaling: float = 10.0
  disable_corrector: tuple[int, ...] = ()  # UniPC: the steps after which no corrector runs
  defaulted: tuple[str, ...] = ()  # keys the file left out: each scheduler class fills in its own default
  # (key, value) of the file's keys in UNIMPLEMENTED that are no field here: refused by the samplers of those
  # classes unless default (as are fields of UNIMPLEMENTED, e.g. Euler's sigma_min).
  unimplemented: tuple[tuple[str, Any], ...] = ()

  @classmethod
  def from_dict(cls, d: dict) -> SchedulerConfig:
    names = [f.name for f in dataclasses.fields(cls) if f.name not in ("defaulted", "unimplemented")]
    class_name = str(d.get("_class_name", "")).removeprefix("Flax")
    if not class_name and d.get("sigma_data") is not None:  # a live EDM scheduler's `.config` (no _class_name)
      class_name = EDM_CLASSES[0]
    defaults = DIFFUSERS_DEFAULTS.get(class_name, DIFFUSERS_DEFAULTS[_FALLBACK_CLASS])
    # A diffusers `scheduler.config` lists the keys it filled with its own class's defaults; a null
    # (trained_betas) means the same as a key left out.
    used_defaults = set(d.get("_use_default_values", ()))
    given = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in d.items()
        if k in names and k not in used_defaults and v is not None
    }
    missing = tuple(sorted(k for k in names if k not in given))
    other = tuple(
        sorted((k, tuple(v) if isinstance(v, list) else v)
               for k, v in d.items()
               if k in _UNIMPLEMENTED_KEYS and k not in names and k not in used_defaults))
    cfg = cls(**{k: v for k, v in defaults.items() if k in missing}, **given, defaulted=missing, unimplemented=other)
    cfg.validate()
    return cfg

  @property
  def edm(self) -> bool:
    """The model has EDM preconditioning: `sigma_data` is set. A file whose `_class_name` is an EDM scheduler
    (EDM_CLASSES) always has it (diffusers' default 0.5 fills it in), as does a diffusers `.config` that names the
    key without a `_class_name`; no other diffusers scheduler reads the key.
    Only the EDM samplers sample such a model, and they sample nothing else (`samplers.make_schedule`)."""
    return self.sigma_data is not None

  def replace(self, **kw) -> SchedulerConfig:
    """A copy with `kw` set; keys set here are no longer `defaulted`, so they hold for every sampler (e.g.
    timestep_spacing="trailing" for few-step SDXL-Turbo / Lightning settings)."""
    kw.setdefault("defaulted", tuple(k for k in self.defaulted if k not in kw))
    return dataclasses.replace(self, **kw)

  def for_class(self, class_name: str) -> SchedulerConfig:
    """This config as diffusers' `class_name` reads it: keys the file left out take that class's defaults."""
    defaults = DIFFUSERS_DEFAULTS[class_name]
    return self.replace(**{k: defaults[k] for k in self.defaulted if k in defaults})

  def check_implemented(self, class_name: str, sampler: str, sets: tuple[str, ...] = ()) -> None:
    """Raises for a setting of the file that diffusers' `class_name` reads and `sampler` does not implement
    (keys in `sets` the sampler chooses itself, as diffusers' from_config(config, algorithm_type=...))."""
    fixed, remapped = UNIMPLEMENTED.get(class_name, {}), _REMAPPED.get(class_name, {})
    given, names = dict(self.unimplemented), {f.name for f in dataclasses.fields(self)}
    for key in fixed:
      value = getattr(self, key) if key in names else given.get(key, fixed[key])  # (fields: as for_class reads)
      value = remapped.get(key, {}).get(value, value) if isinstance(value, str) else value
      if key not in sets and value != fixed[key]:
        raise ValueError(f"{sampler} with {key}={value!r} is not implemented (only {key}={fixed[key]!r}, diffusers' "
                         f"default for {class_name}); remove the key from scheduler_config.json or choose another "
                         "sampler.")

  def to_dict(self) -> dict:
    d = super().to_dict()
    del d["defaulted"], d["unimplemented"]
    return d

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> SchedulerConfig:
    """Reads `scheduler_config.json` from a file, its folder, or a model folder above it."""
    path = os.fspath(path)
    if os.path.isdir(path):
      for name in ("scheduler_config.json", os.path.join("scheduler", "scheduler_config.json")):
        if os.path.exists(os.path.join(path, name)):
          path = os.path.join(path, name)
          break
      else:
        raise FileNotFoundError(f"{path}: no scheduler_config.json here nor in scheduler/; pass a diffusers model "
                                "folder, its scheduler/ folder, or the json file.")
    return cls.from_dict(read_json_object(path))

  def validate(self) -> None:
    if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
      raise ValueError(f"beta_schedule={self.beta_schedule!r} is not supported; use one of {BETA_SCHEDULES} "
                       "or give trained_betas.")
    if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
      raise ValueError(f"trained_betas has {len(self.trained_betas)} values but num_train_timesteps="
                       f"{self.num_train_timesteps}; they must agree.")
    if self.prediction_type not in PREDICTION_TYPES:
      raise ValueError(f"prediction_type={self.prediction_type!r} is not supported; use one of {PREDICTION_TYPES}.")
    if self.timestep_spacing is not None and self.timestep_spacing not in TIMESTEP_SPACINGS:
      raise ValueError(f"timestep_spacing={self.timestep_spacing!r} is not supported; use one of {TIMESTEP_SPACINGS}.")
    if self.num_train_timesteps < 2:
      raise ValueError(f"num_train_timesteps={self.num_train_timesteps}: need at least 2.")
    if self.sigma_schedule not in SIGMA_SCHEDULES:
      raise ValueError(f"sigma_schedule={self.sigma_schedule!r} is not supported; use one of {SIGMA_SCHEDULES}.")
    if self.final_sigmas_type not in FINAL_SIGMAS_TYPES:
      raise ValueError(f"final_sigmas_type={self.final_sigmas_type!r} is not supported; use one of "
                       f"{FINAL_SIGMAS_TYPES}.")
    if self.edm and not (self.sigma_data > 0 and 0 < (self.sigma_min or 0) < (self.sigma_max or 0)):
      raise ValueError(f"EDM schedule sigma_data={self.sigma_data}, sigma_min={self.sigma_min}, sigma_max="
                       f"{self.sigma_max}: need sigma_data > 0 and 0 < sigma_min < sigma_max.")
    if self.thresholding:
      raise ValueError("thresholding=True (dynamic thresholding) is not supported; set it to false "
                       "(it is meant for pixel-space models, not latent diffusion).")


# --- The training schedule, bit-exact with diffusers (built once, in numpy). ---


def _torch_linspace(start: float, end: float, n: int) -> np.ndarray:
  """`torch.linspace(start, end, n, dtype=float32)`, bit for bit.

  PyTorch computes the step in float32, then `start + step * i` for the first half and
  `end - step * (n - 1 - i)` for the second, each with one rounding (a fused multiply-add).
  """
  s, e = np.float32(start), np.float32(end)
  if n == 1:
    return np.array([s], np.float32)
  step = np.float64((e - s) / np.float32(n - 1))
  i = np.arange(n, dtype=np.float64)
  half = n // 2
  return np.concatenate([s + step * i[:half], e - step * (n - 1 - i[half:])]).astype(np.float32)


def _alpha_bar_cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
  """Betas of the cosine schedule, Nichol & Dhariwal (2021) eq. 17 (diffusers' squaredcos_cap_v2)."""
  f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2)**2
  return np.array([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)], np.float32)


def _cumprod(alphas: np.ndarray) -> np.ndarray:
  # torch.cumprod on CPU accumulates float32 in float64.
  return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """float32 betas whose alpha_bar ends at exactly 0 (the last timestep is pure noise) and keeps its first
  value: Lin et al. (2024), "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1,
  in diffusers' float32 arithmetic. SD's schedule leaves sqrt(alpha_bar_T) = 0.068 of the image in x_T, so
  a model learns to read the layout from the noise it is given and cannot choose one from pure noise."""
  root = np.sqrt(_cumprod(np.float32(1.0) - betas))
  first, last = root[0], root[-1]
  root = (root - last) * (first / (first - last))
  alpha_bar = root * root
  alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
  return (np.float32(1.0) - alphas).astype(np.float32)


def betas(cfg: SchedulerConfig) -> np.ndarray:
  """float32 [num_train_timesteps]: the forward-process variances beta_t."""
  n = cfg.num_train_timesteps
  if cfg.trained_betas is not None:
    b = np.asarray(cfg.trained_betas, np.float32)
  elif cfg.beta_schedule == "linear":
    b = _torch_linspace(cfg.beta_start, cfg.beta_end, n)
  elif cfg.beta_schedule == "scaled_linear":
    b = _torch_linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n)**2
  elif cfg.beta_schedule == "squaredcos_cap_v2":
    b = _alpha_bar_cosine_betas(n)
  else:
    raise ValueError(f"beta_schedule={cfg.beta_schedule!r} is not supported; use one of {BETA_SCHEDULES}.")
  return rescale_zero_terminal_snr(b) if cfg.rescale_betas_zero_snr else b


def alphas_cumprod_np(cfg: SchedulerConfig) -> np.ndarray:
  """float32 [num_train_timesteps]: alpha_bar_t = prod_{s<=t} (1 - beta_s), as a numpy array."""
  return _cumprod(np.float32(1.0) - betas(cfg))


def alphas_cumprod(cfg: SchedulerConfig) -> jax.Array:
  """float32 [num_train_timesteps]: alpha_bar_t = prod_{s<=t} (1 - beta_s)."""
  return jnp.asarray(alphas_cumprod_np(cfg))


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
  """float32 [T]: sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the VE noise level (Karras et al., 2022)."""
  ac = np.asarray(alphas_cumprod, np.float32)
  return np.sqrt((np.float32(1.0) - ac) / ac)


# --- Inference timesteps: each diffusers scheduler family spaces them its own way. ---


def _check_steps(cfg: SchedulerConfig, n: int) -> None:
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"num_steps={n!r}: need an integer >= 1.")
  if n > cfg.num_train_timesteps:
    raise ValueError(f"num_steps={n} is larger than num_train_timesteps={cfg.num_train_timesteps}.")


def timestep_spacing(cfg: SchedulerConfig, default: str) -> str:
  """cfg.timestep_spacing, or the scheduler family's `default` when the config names none."""
  return cfg.timestep_spacing or default


def discrete_timesteps(cfg: SchedulerConfig, n: int) -> np.ndarray:
  """int64 [n], descending: DDIM's / DDPM's timesteps (PNDM's, in ascending order).

  Table 2 of Lin et al. (2023) defines the three spacings.
  """
  _check_steps(cfg, n)
  T, spacing = cfg.num_train_timesteps, timestep_spacing(cfg, "leading")
  if spacing == "linspace":
    return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
  if spacing == "leading":
    return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + cfg.steps_offset
  return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1  # trailing


def sigma_timesteps(cfg: SchedulerConfig, n: int) -> np.ndarray:
  """float32 [n], descending: the Euler / Heun / LMS family's timesteps (not rounded in linspace)."""
  _check_steps(cfg, n)
  T, spacing = cfg.num_train_timesteps, timestep_spacing(cfg, "linspace")
  if spacing == "linspace":
    return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
  if spacing == "leading":
    t = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float32)
    return t + np.float32(cfg.steps_offset)
  return np.arange(T, 0, -T / n).round().astype(np.float32) - np.float32(1)  # trailing


def dpm_timesteps(cfg: SchedulerConfig, n: int) -> np.ndarray:
  """int64 [n], descending: DPM-Solver's timesteps (it spaces n + 1 points and drops t=0)."""
  _check_steps(cfg, n)
  T, spacing = cfg.num_train_timesteps, timestep_spacing(cfg, "linspace")
  if spacing == "linspace":
    return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
  if spacing == "leading":
    t = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].astype(np.int64)
    return t + cfg.steps_offset
  return np.arange(T, 0, -T / n).round().astype(np.int64) - 1  # trailing


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
  """float64 [n]: the noise levels of Karras et al. (2022), eq. 5."""
  ramp = np.linspace(0, 1, n)
  min_inv_rho, max_inv_rho = sigma_min**(1 / rho), sigma_max**(1 / rho)
  return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho))**rho


def edm_sigmas(cfg: SchedulerConfig, n: int, float32_ramp: bool = False) -> np.ndarray:
  """float32 [n], descending: EDM's noise levels from sigma_max to sigma_min, "karras" (Karras et al. (2022)
  eq. 5) or "exponential" (even in log sigma, k-diffusion's get_sigmas_exponential), as diffusers' EDM schedulers.

  EDMEulerScheduler ramps from 0 to 1 in float64, EDMDPMSolverMultistepScheduler in float32 (`float32_ramp`).
  torch's float32 exp and pow are within an ulp of the exact value: rounding float64's agrees far more often
  than numpy's float32 functions (an ulp of sigma_max shows as 1e-5 in a two-step run).
  """
  if cfg.sigma_schedule == "exponential":  # float32 (torch.linspace's default dtype), as diffusers
    log_sigma = _torch_linspace(math.log(cfg.sigma_min), math.log(cfg.sigma_max), n).astype(np.float64)
    return np.exp(log_sigma).astype(np.float32)[::-1].copy()
  if not float32_ramp:
    return karras_sigmas(cfg.sigma_min, cfg.sigma_max, n, cfg.rho).astype(np.float32)
  lo, hi = cfg.sigma_min**(1 / cfg.rho), cfg.sigma_max**(1 / cfg.rho)
  base = np.float32(hi) + _torch_linspace(0.0, 1.0, n) * np.float32(lo - hi)
  return (base.astype(np.float64)**np.float32(cfg.rho)).astype(np.float32)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
  """float64: the fractional timesteps whose sigma is `sigmas`, interpolating log sigma linearly."""
  sigmas = np.asarray(sigmas)
  log_sigma = np.log(np.maximum(sigmas, 1e-10)).reshape(-1)
  dists = log_sigma - log_sigmas[:, None]
  low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
  w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
  return ((1 - w) * low + w * (low + 1)).reshape(sigmas.shape)


# --- Training helpers: jittable, fp32 schedule arithmetic whatever the dtype of x0. ---


def _at(alphas_cumprod: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """alpha_bar[t] in float32, with trailing unit axes so it broadcasts against an ndim array."""
  t = jnp.asarray(t)
  if t.ndim > ndim:
    raise ValueError(f"t has shape {t.shape}; it must be a scalar or a [batch] vector for x0 of rank {ndim}.")
  a = jnp.asarray(alphas_cumprod, jnp.float32)[t]
  return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def add_noise(alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """Samples q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), Ho et al. (2020) eq. 4.

  `t` holds integer timesteps, one per example (or a scalar); the result has x0's dtype.
  """
  a = _at(alphas_cumprod, t, x0.ndim)
  out = jnp.sqrt(a) * x0.astype(jnp.float32) + jnp.sqrt(1.0 - a) * noise.astype(jnp.float32)
  return out.astype(x0.dtype)


def velocity(alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """The v-prediction target v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0, Salimans & Ho (2022) sec. 4."""
  a = _at(alphas_cumprod, t, x0.ndim)
  out = jnp.sqrt(a) * noise.astype(jnp.float32) - jnp.sqrt(1.0 - a) * x0.astype(jnp.float32)
  return out.astype(x0.dtype)


def snr(alphas_cumprod: jax.Array, t: jax.Array) -> jax.Array:
  """float32 signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), for min-SNR weighting (Hang et al., 2023)."""
  a = jnp.asarray(alphas_cumprod, jnp.float32)[jnp.asarray(t)]
  return a / (1.0 - a)
