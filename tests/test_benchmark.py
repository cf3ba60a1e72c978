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


def test_imbsam_peak_memory_within_sams(tmp_path):
  """Compiled memory: the default and the fast ImbSAM step need no more than SAM.

  Guards the ordering of the tail passes after the clean one (without it XLA
  keeps both passes' activations live: +30% here at 20% tail).
  """
  import jax

  benchmark = load_example("benchmark")
  args = benchmark.parse_args(["--width=8"])
  batch = benchmark.make_batch(64, num_tail=13)
  memory = {}
  for variant, capacity in [("sam", 0), ("imbsam", 0), ("imbsam-fast", 24)]:
    step, state = benchmark.build_step(variant, args, "group", capacity)
    compiled = step.lower(state, batch, jax.random.key(0)).compile()
    memory[variant] = benchmark.peak_memory_bytes(compiled)
  if memory["sam"] is None:  # a backend without memory analysis
    return
  assert memory["imbsam"] <= memory["sam"] * 1.01, memory
  assert memory["imbsam-fast"] <= memory["sam"], memory
