"""benchmarks/chart.py: the suite's chart reads run.py's results as they are written."""

import importlib.util
import json
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def chart():
  spec = importlib.util.spec_from_file_location("chart", os.path.join(REPO, "benchmarks", "chart.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _case(name, dtype, jaxsd_s, torch_s, flops, peak, workload="train"):
  info = {"flops": flops, "device_kind": "NVIDIA H200", "peak_bf16_flops": peak}
  return {
      "name": name,
      "workload": workload,
      "spec": {
          "dtype": dtype
      },
      "impls": {
          "jaxsd": {
              "median_s": jaxsd_s,
              "info": info
          },
          "torch": {
              "median_s": torch_s
          }
      },
  }


def test_rows_give_mfu_only_with_flops_peak_and_low_precision(chart):
  results = [
      _case("train sd15 b16 512px bfloat16", "bfloat16", 0.16, 0.225, 37.7e12, 989e12),
      _case("train small b2 float32", "float32", 2.0, 1.5, 1e11, None),  # the CPU: no peak
      _case("train sd15 b32 256px bfloat16", "bfloat16", 0.088, 0.166, 0.0, 989e12),  # no count recorded
      {
          "name": "compile sd15 train",
          "workload": "compile",
          "impls": {
              "jaxsd": {
                  "median_s": 30.0
              }
          }
      },
  ]
  r = chart.rows(results)
  assert [x["name"] for x in r] == [c["name"] for c in results[:3]]  # compile cases are not timed cases
  np.testing.assert_allclose(r[0]["mfu"], 37.7e12 / 0.16 / 989e12)
  assert r[1]["mfu"] is None and r[2]["mfu"] is None
  assert r[0]["times"] == {"jaxsd": 0.16, "torch": 0.225}
  # A supplied count replaces the recorded 0 for the cases whose name contains the part.
  r = chart.rows(results, gflop={"b32 256px": 16281.5})
  np.testing.assert_allclose(r[2]["mfu"], 16281.5e9 / 0.088 / 989e12)


def test_draw_writes_a_png_and_says_why_when_empty(chart, tmp_path):
  path = str(tmp_path / "r.png")
  assert chart.draw([_case("train x bfloat16", "bfloat16", 0.1, 0.2, 1e13, 989e12)], path) is None
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert chart.draw([], str(tmp_path / "none.png")) == "no timed case with a median"
  assert not os.path.exists(tmp_path / "none.png")


def test_command_reads_results_json_and_rejects_a_bad_gflop(chart, tmp_path):
  results = tmp_path / "results.json"
  results.write_text(json.dumps({"results": [_case("train x bfloat16", "bfloat16", 0.1, 0.2, 0.0, 989e12)]}))
  out = tmp_path / "c.png"
  assert chart.main([str(results), "--out", str(out), "--gflop", "train x=1000"]) == 0
  assert out.stat().st_size > 0
  with pytest.raises(SystemExit) as e:
    chart.main([str(results), "--gflop", "37.7"])
  assert e.value.code == 2
