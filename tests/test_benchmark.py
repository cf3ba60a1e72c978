"""Smoke test of examples/benchmark.py on a tiny setting."""

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_example(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_benchmark_writes_ratios(tmp_path, capsys):
  benchmark = load_example("benchmark")
  out = tmp_path / "bench.json"
  result = benchmark.main(
    [
      "--batch-size=16",
      "--width=4",
      "--norms=none",
      "--tail-fractions=0.2",
      "--variants=sgd,imbsam-fast",
      "--rounds=1",
      "--steps-per-round=1",
      f"--json={out}",
    ]
  )
  assert json.loads(out.read_text()) == json.loads(json.dumps(result))
  rows = {r["variant"]: r for r in result["rows"]}
  assert rows["sgd"]["ratio_to_sgd"] == 1.0
  fast = rows["imbsam-fast"]
  assert fast["num_tail"] == 3 and fast["tail_capacity"] == 8
  assert fast["passes"] == 3 + 6 * 8 / 16
  assert fast["ms"] > 0 and fast["peak_memory_mb"] > 0
  assert "imbsam-fast" in capsys.readouterr().out
