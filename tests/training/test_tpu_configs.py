"""train/configs/tpu_v5e.py and tpu_v5p.py: the mesh and batch they choose fit the slices they name (no TPU
here: the configs are checked as `python -m train` checks any config, on the device counts of those slices)."""

import pytest

from jaxsd.training import run
from jaxsd.training import sharding
from train.configs import tpu_v5e
from train.configs import tpu_v5p

SD15_UNET_PARAMETERS = 859_520_964  # the published config's count (benchmarks/sd15_configs.py checks it)
GB = 1e9


@pytest.mark.parametrize("chips, mesh", [(8, (1, 8)), (16, (2, 8)), (256, (32, 8))])
def test_v5e_shards_the_state_within_a_host(chips, mesh):
  cfg = tpu_v5e.get_config(str(chips))
  assert sharding.mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, chips) == mesh
  assert cfg.unet.batch_size == 32 * chips and cfg.unet.gradient_checkpointing and cfg.unet.cache_latents
  run.check_config(cfg, chips)  # what `python -m train` checks before any work (cache: no flips or crops)
  # The reason for fsdp: fp32 weights, two AdamW moments, EMA and gradients do not fit one 16 GiB chip.
  state = SD15_UNET_PARAMETERS * 4 * (1 + 2 + 1 + 1)
  assert state > 16 * 2**30 and state / mesh[1] < 3 * GB


@pytest.mark.parametrize("chips", [4, 8])
def test_v5p_replicates_the_state(chips):
  cfg = tpu_v5p.get_config(str(chips))
  assert sharding.mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, chips) == (chips, 1)
  assert cfg.unet.batch_size == 64 * chips and not cfg.unet.gradient_checkpointing
  run.check_config(cfg, chips)
  assert SD15_UNET_PARAMETERS * 4 * 5 < 95 * 2**30 / 4  # replicated state and gradients: under a quarter of HBM


def test_bad_chip_counts_are_refused():
  with pytest.raises(ValueError, match="number of chips"):
    tpu_v5e.get_config("12")
  with pytest.raises(ValueError, match="number of chips"):
    tpu_v5p.get_config("0")
