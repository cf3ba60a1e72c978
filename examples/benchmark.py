"""Step time and compiled memory of SGD, SAM and ImbSAM, measured in one process.

Every variant is the same jitted training step from ``imbsam_jax.recipes.training``
on the same model and batch; only the optimizer differs:

- ``sgd``: the clean gradient (3 passes, counting a forward on the batch as 1 and a
  backward as 2);
- ``sam``: ``optax.contrib.sam`` in opaque mode (6 passes);
- ``imbsam``: the default update, tail gradient at w recomputed (9 passes);
- ``imbsam-exact``: the tail gradient from the clean forward via
  ``value_and_tail_grads`` (8 passes, the reference implementation's count);
- ``imbsam-fast``: ``tail_capacity=k``, the two tail passes on k gathered examples
  (3 + 6k/B passes).

Times are medians over rounds in which the variants run interleaved, so that drifts
of a noisy machine hit all of them alike; ratios to SGD (and SAM) in the same process
are the numbers to compare across machines, not milliseconds.

Example::

  python examples/benchmark.py --json runs/benchmark.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import imbsam_jax
from imbsam_jax.recipes import models, training

NUM_CLASSES = 10
TAIL_CLASS = NUM_CLASSES - 1
VARIANTS = ("sgd", "sam", "imbsam", "imbsam-exact", "imbsam-fast")
PASSES = {"sgd": 3, "sam": 6, "imbsam": 9, "imbsam-exact": 8}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument(
    "--depth", type=int, default=8, help="CIFAR ResNet depth 6n+2 (32 = ResNet-32)"
  )
  parser.add_argument("--width", type=int, default=16)
  parser.add_argument(
    "--norms", default="batch,group", help="comma list of batch, group, none"
  )
  parser.add_argument(
    "--tail-fractions", default="0.03,0.2", help="share of tail examples per batch"
  )
  parser.add_argument(
    "--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}"
  )
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps-per-round", type=int, default=3)
  parser.add_argument(
    "--capacity-std",
    type=float,
    default=2.0,
    help="tail_capacity = mean + this many binomial std of the tail count (x8)",
  )
  parser.add_argument("--json", default=None, help="also write the numbers here")
  return parser.parse_args(argv)


def make_batch(batch_size: int, num_tail: int, seed: int = 0) -> dict[str, Any]:
  """A batch with exactly ``num_tail`` examples of the tail class."""
  rng = np.random.default_rng(seed)
  label = rng.integers(0, TAIL_CLASS, size=batch_size)
  label[rng.choice(batch_size, size=num_tail, replace=False)] = TAIL_CLASS
  image = rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32)
  return {"image": jnp.asarray(image), "label": jnp.asarray(label, jnp.int32)}


def per_example_loss(model: nnx.Module, batch: dict[str, Any]):
  logits = model(batch["image"])
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  return losses, {}


def build_step(variant: str, args: argparse.Namespace, norm: str, capacity: int):
  """The jitted step and its initial state for one variant."""
  mask_fn = imbsam_jax.tail_mask_from_counts(
    [1000] * TAIL_CLASS + [10], eta=20
  )  # the last class is the tail
  base = optax.sgd(0.01, momentum=0.9)
  method = "imbsam" if variant.startswith("imbsam") else variant
  kwargs = {"tail_capacity": capacity} if variant == "imbsam-fast" else {}
  tx = training.make_optimizer(method, base, rho=0.05, tail_mask_fn=mask_fn, **kwargs)
  model = models.CifarResNet(
    NUM_CLASSES, depth=args.depth, width=args.width, norm=norm, rngs=nnx.Rngs(0)
  )
  graphdef, state = training.init_train_state(model, tx)
  step = training.make_train_step(
    graphdef,
    per_example_loss,
    method,
    tx,
    tail_mask_fn=mask_fn if variant == "imbsam-exact" else None,
  )
  return jax.jit(step), state


def peak_memory_bytes(compiled: Any) -> int | None:
  """Arguments + outputs + temporaries of a compiled step (XLA memory analysis).

  The same formula on every backend (``peak_memory_in_bytes`` is not filled in by
  XLA:CPU); donation would lower it equally for all variants.
  """
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return int(
    analysis.temp_size_in_bytes
    + analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    - analysis.alias_size_in_bytes
  )


def benchmark_setting(
  args: argparse.Namespace, norm: str, tail_fraction: float, variants: list[str]
) -> list[dict[str, Any]]:
  batch_size = args.batch_size
  num_tail = round(tail_fraction * batch_size)
  # Two groups of classes, the second (share tail_fraction of the data) the tail.
  counts = np.array([1 - tail_fraction, tail_fraction]) * 1e6
  capacity = imbsam_jax.suggest_tail_capacity(
    counts, eta=counts[1] + 1, batch_size=batch_size, num_std=args.capacity_std
  )
  batch = make_batch(batch_size, num_tail)
  key = jax.random.key(0)
  runners = {}
  memory = {}
  for variant in variants:
    step, state = build_step(variant, args, norm, capacity)
    compiled = step.lower(state, batch, key).compile()
    memory[variant] = peak_memory_bytes(compiled)
    for _ in range(2):  # warm up
      state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    runners[variant] = [step, state]

  times: dict[str, list[float]] = {v: [] for v in variants}
  for _ in range(args.rounds):
    for variant in variants:
      step, state = runners[variant]
      for _ in range(args.steps_per_round):
        start = time.perf_counter()
        state, metrics = step(state, batch, key)
        jax.block_until_ready((state, metrics))
        times[variant].append(time.perf_counter() - start)
      runners[variant][1] = state
    for variant in variants:
      assert runners[variant][0]._cache_size() == 1, f"{variant} recompiled"

  median = {v: statistics.median(t) for v, t in times.items()}
  rows = []
  for variant in variants:
    passes = PASSES.get(variant, 3 + 6 * capacity / batch_size)
    rows.append(
      {
        "norm": norm,
        "tail_fraction": tail_fraction,
        "num_tail": num_tail,
        "variant": variant,
        "tail_capacity": capacity if variant == "imbsam-fast" else None,
        "ms": 1e3 * median[variant],
        "ratio_to_sgd": median[variant] / median["sgd"] if "sgd" in median else None,
        "ratio_to_sam": median[variant] / median["sam"] if "sam" in median else None,
        "passes": passes,
        "ideal_ratio_to_sgd": passes / 3,
        "peak_memory_mb": None if memory[variant] is None else memory[variant] / 2**20,
      }
    )
  return rows


def format_table(rows: list[dict[str, Any]]) -> str:
  header = (
    f"{'norm':6} {'tail':>5} {'variant':13} {'k':>4} {'ms':>9} {'x SGD':>6}"
    f" {'x SAM':>6} {'ideal':>6} {'peak MB':>8}"
  )
  lines = [header, "-" * len(header)]
  fmt = lambda x, spec: "-" if x is None else format(x, spec)
  for r in rows:
    lines.append(
      f"{r['norm']:6} {r['tail_fraction']:5.0%} {r['variant']:13}"
      f" {fmt(r['tail_capacity'], '4d'):>4} {r['ms']:9.1f}"
      f" {fmt(r['ratio_to_sgd'], '6.2f'):>6} {fmt(r['ratio_to_sam'], '6.2f'):>6}"
      f" {r['ideal_ratio_to_sgd']:6.2f} {fmt(r['peak_memory_mb'], '8.1f'):>8}"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise SystemExit(f"unknown variants {unknown}; choose from {VARIANTS}")
  norms = [n.strip() for n in args.norms.split(",") if n.strip()]
  fractions = [float(f) for f in args.tail_fractions.split(",")]
  if any(not 0 <= f <= 1 for f in fractions):
    raise SystemExit("--tail-fractions must lie in [0, 1]")
  rows = []
  for norm in norms:
    for fraction in fractions:
      rows.extend(benchmark_setting(args, norm, fraction, variants))
      print(
        format_table(
          [r for r in rows if r["norm"] == norm and r["tail_fraction"] == fraction]
        ),
        flush=True,
      )
      print(flush=True)
  result = {
    "device": str(jax.devices()[0].device_kind),
    "platform": jax.default_backend(),
    "jax": jax.__version__,
    "batch_size": args.batch_size,
    "model": f"CifarResNet-{args.depth} width {args.width}",
    "rounds": args.rounds,
    "steps_per_round": args.steps_per_round,
    "rows": rows,
  }
  print(
    f"{result['model']}, batch {args.batch_size}, {result['platform']}"
    f" ({result['device']}), jax {jax.__version__}"
  )
  print(format_table(rows))
  if args.json:
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
