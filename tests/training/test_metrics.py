"""metrics.jsonl survives a write cut short (a kill, a full disk): the next run appends valid lines."""

from __future__ import annotations

from jaxsd.training import metrics


def test_a_cut_last_line_is_dropped_and_appending_continues(tmp_path):
  """The rerun's rows were appended onto the cut line and every later read failed (JSONDecodeError)."""
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
  assert metrics.read_jsonl(str(path)) == [{"step": 1, "loss": 0.5}]  # a reader before the rerun
  w = metrics.MetricWriter(str(tmp_path), tensorboard=False, enabled=True)
  w.write_scalars(2, {"loss": 0.25})
  w.close()
  assert metrics.read_jsonl(str(path)) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
