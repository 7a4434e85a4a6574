"""Noise schedules and samplers as pure functions; no network imports here."""

from jaxsd.diffusion.samplers import ALIASES
from jaxsd.diffusion.samplers import ETA_SAMPLERS
from jaxsd.diffusion.samplers import SAMPLER_OF
from jaxsd.diffusion.samplers import SAMPLERS
from jaxsd.diffusion.samplers import Sampler
from jaxsd.diffusion.steps import Schedule
from jaxsd.diffusion.samplers import init_state
from jaxsd.diffusion.samplers import make_schedule
from jaxsd.diffusion.samplers import model_input
from jaxsd.diffusion.samplers import noise_latents
from jaxsd.diffusion.samplers import prepare_latents
from jaxsd.diffusion.samplers import sample
from jaxsd.diffusion.samplers import step
from jaxsd.diffusion.samplers import step_noise
from jaxsd.diffusion.samplers import stochastic
from jaxsd.diffusion.schedules import SchedulerConfig
from jaxsd.diffusion.schedules import add_noise
from jaxsd.diffusion.schedules import alphas_cumprod
from jaxsd.diffusion.schedules import snr
from jaxsd.diffusion.schedules import velocity
