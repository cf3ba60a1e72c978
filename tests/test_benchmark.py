"""Smoke tests of examples/benchmark.py on tiny settings."""

import json

import pytest

import benchmark  # examples/ is on the path (pyproject.toml)


def test_benchmark_writes_ratios(tmp_path, capsys):
  out = tmp_path / "bench.json"
  result = benchmark.main(
    [
      "--batch-size=16",
      "--width=4",
      "--norms=none",
      "--tail-fractions=0.2",
      "--variants=sgd,imbsam-fast,imbsam-static,sse-sam",
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
  # The overflow chunks' while loop, and the step without control flow.
  assert rows["sgd"]["control_flow_ops"] == 0 and fast["control_flow_ops"] >= 1
  assert rows["imbsam-static"]["control_flow_ops"] == 0
  assert rows["imbsam-static"]["tail_capacity"] == 8
  assert rows["sse-sam"]["passes"] == 11 and rows["sse-sam"]["ratio_to_sgd"] > 1
  printed = capsys.readouterr().out
  assert "imbsam-static" in printed and "loops" in printed


def test_imbsam_peak_memory_within_sams(tmp_path):
  """Compiled memory: the default and the fast ImbSAM step need no more than SAM,
  SSE-SAM's no more than ImbSAM's.

  Guards the ordering of the tail passes after the clean one (without it XLA
  keeps both passes' activations live: +30% here at 20% tail).
  """
  import jax

  args = benchmark.parse_args(["--width=8"])
  batch = benchmark.make_batch(64, num_tail=13)
  memory = {}
  for norm, variant, capacity in [
    ("group", "sam", 0),
    ("group", "imbsam", 0),
    ("group", "imbsam-fast", 24),
    ("group", "sse-sam", 0),
    ("batch", "sam", 0),
    ("batch", "imbsam-fast", 24),  # anchored BatchNorm statistics
  ]:
    step, state = benchmark.build_step(variant, args, norm, capacity)
    compiled = step.lower(state, batch, jax.random.key(0)).compile()
    memory[norm, variant] = benchmark.peak_memory_bytes(compiled)
  if memory["group", "sam"] is None:  # a backend without memory analysis
    return
  assert memory["group", "imbsam"] <= memory["group", "sam"] * 1.01, memory
  assert memory["group", "imbsam-fast"] <= memory["group", "sam"], memory
  # SSE-SAM's head pass after the tail pass (overlapped: +80% on the ResNet-8).
  assert memory["group", "sse-sam"] <= memory["group", "imbsam"] * 1.05, memory
  assert memory["batch", "imbsam-fast"] <= memory["batch", "sam"], memory


def test_benchmark_options(tmp_path, capsys):
  """Singular flags with the old plural aliases; a bad value is one line, exit 2."""
  config = benchmark.parse_args(["--norm", "group", "--variant", "sgd,sam"])
  assert config.norm == ("group",) and config.variant == ("sgd", "sam")
  assert benchmark.parse_args(["--json", "x.json"]).out == "x.json"
  for argv, message in [
    (["--norms", "foo"], "--norm/--norms: 'foo' is not one of batch, group, none"),
    (["--depth", "10"], "--depth: must be 6n + 2 with n >= 1, got 10"),
    (["--tail-fraction", "1.5"], "--tail-fraction/--tail-fractions: must lie in"),
  ]:
    try:
      benchmark.parse_args(argv)
    except SystemExit as e:
      assert e.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.slow  # ~35 s of compiling; test_benchmark_writes_ratios runs the script
def test_benchmark_bfloat16_and_one_compile_per_step(monkeypatch):
  """``--dtype bfloat16`` runs; a step is built once for all the tail shares that
  share it (only ``imbsam-fast`` depends on the share, through its capacity)."""
  built = []
  build_step = benchmark.build_step
  monkeypatch.setattr(
    benchmark,
    "build_step",
    lambda variant, *a: built.append(variant) or build_step(variant, *a),
  )
  result = benchmark.main(
    [
      "--batch-size=16",
      "--width=4",
      "--norm=none",
      "--dtype=bfloat16",
      "--tail-fraction=0.1,0.5",
      "--variant=sgd,imbsam-fast",
      "--rounds=1",
      "--steps-per-round=1",
    ]
  )
  assert result["dtype"] == "bfloat16"
  assert result["model"] == "CifarResNet-8 width 4"
  capacities = [r["tail_capacity"] for r in result["rows"] if r["tail_capacity"]]
  assert capacities == [8, 16]  # two capacities: imbsam-fast built twice
  assert built == ["sgd", "imbsam-fast", "imbsam-fast"]
  assert all(r["images_per_s"] > 0 for r in result["rows"])


def test_benchmark_imagenet_models_shapes():
  """``--model resnet50``: 224x224 images and 1000 classes, the tail class last."""
  args = benchmark.parse_args(["--model", "resnet50", "--dtype", "bfloat16"])
  assert benchmark.shape(args) == (224, 1000)
  batch = benchmark.make_batch(4, num_tail=1, image_size=224, num_classes=1000)
  assert batch["image"].shape == (4, 224, 224, 3)
  assert int((batch["label"] == 999).sum()) == 1
