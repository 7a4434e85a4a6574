"""The line protocol between the driver (`run.py`) and a worker process, and both ends of it.

A worker is started once per (case, implementation), loads its model on `setup`, and answers one
JSON line per request on stdin: `setup` -> compile/warm-up facts, `run` -> the seconds of one
timed iteration (the worker synchronises the device itself, so pipe latency is not timed),
`stats` -> peak host RSS and device memory, `exit`. The driver alternates `run` requests between
the workers of a case, so drift of the (shared) machine hits every implementation alike.

Standard library only: the diffusers 0.39 worker runs this in its own venv.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import select
import subprocess
import sys
import time
import traceback
from typing import Any, Callable


@dataclasses.dataclass
class Case:
  """What a worker's `setup` returns: one timed iteration, and facts to report."""

  run: Callable[[], float | tuple[float, dict[str, float]]]  # seconds, or (seconds, side timings)
  info: dict[str, Any] = dataclasses.field(default_factory=dict)


def timed(fn: Callable[[], Any]) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def maxrss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --- worker side -----------------------------------------------------------------------------


def serve(setup: Callable[[dict], Case], device_memory: Callable[[], float | None] = lambda: None) -> None:
  """The worker's main loop. Protocol replies use the original stdout; whatever the libraries
  print is sent to stderr (the driver's log file) so it cannot corrupt the protocol."""
  channel = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)
  case = None
  for line in sys.stdin:
    msg = json.loads(line)
    cmd = msg.get("cmd")
    try:
      if cmd == "setup":
        t0 = time.perf_counter()
        case = setup(msg["spec"])
        reply = {"info": case.info, "setup_s": time.perf_counter() - t0}
      elif cmd == "run":
        out = case.run()
        reply = {"seconds": out[0], "extra": out[1]} if isinstance(out, tuple) else {"seconds": out}
      elif cmd == "stats":
        reply = {"maxrss_mb": maxrss_mb(), "device_peak_mb": device_memory()}
      elif cmd == "exit":
        break
      else:
        raise ValueError(f"unknown command {cmd!r}")
      reply["ok"] = True
    except Exception as e:  # reported to the driver, which records the case as failed
      traceback.print_exc()
      reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    channel.write(json.dumps(reply) + "\n")


# --- driver side -----------------------------------------------------------------------------


class WorkerError(RuntimeError):
  pass


class Worker:
  """A worker process: `python script` with the protocol on its stdin/stdout, stderr to `log`."""

  def __init__(self, python: str, script: str, log: str, env: dict[str, str] | None = None):
    self.log = log
    self._log_file = open(log, "a")
    self.proc = subprocess.Popen([python, "-u", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self._log_file, env={
                                     **os.environ,
                                     **(env or {})
                                 }, text=True, bufsize=1)

  def call(self, msg: dict, timeout: float) -> dict:
    if self.proc.poll() is not None:
      raise WorkerError(f"worker exited with code {self.proc.returncode}; {self._tail()}")
    self.proc.stdin.write(json.dumps(msg) + "\n")
    self.proc.stdin.flush()
    ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
    if not ready:
      self.close(kill=True)
      raise WorkerError(f"no answer to {msg['cmd']!r} within {timeout:.0f} s; {self._tail()}")
    line = self.proc.stdout.readline()
    if not line:
      self.proc.wait()
      raise WorkerError(f"worker died (exit code {self.proc.returncode}, e.g. out of memory); {self._tail()}")
    reply = json.loads(line)
    if not reply.pop("ok", False):
      raise WorkerError(reply.get("error", "unknown error") + f" (traceback in {self.log})")
    return reply

  def _tail(self, n: int = 6) -> str:
    self._log_file.flush()
    with open(self.log, errors="replace") as f:
      lines = [l.rstrip() for l in f.readlines() if l.strip()]
    return f"last lines of {self.log}: " + " | ".join(lines[-n:])

  def close(self, kill: bool = False) -> None:
    if self.proc.poll() is None:
      if not kill:
        try:
          self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
          self.proc.stdin.flush()
          self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
          pass
      if self.proc.poll() is None:
        self.proc.kill()
        self.proc.wait()
    self._log_file.close()
