"""The processes of a multi-host run: which one writes the workdir's shared files, and waiting for one another."""

from __future__ import annotations

import contextlib

import jax

from jaxsd.training import sharding


def primary() -> bool:
  """Whether this process writes the workdir's shared files (exported model, results, samples, report): only
  process 0 does; every process trains (checkpoints are written by orbax, once) and evaluates alike."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Every process waits here for the others (e.g. until process 0 has written what they read next)."""
  sharding.sync_processes(name)


@contextlib.contextmanager
def primary_first(name: str):
  """Process 0 runs the block first (it writes a shared cache: a dataset, the judge), then the others, which
  find it written."""
  if not primary():
    sync(name)
  yield
  if primary():
    sync(name)
