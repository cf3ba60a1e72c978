"""Step time and compiled memory of SGD, SAM and ImbSAM, measured in one process.

Every variant is the same jitted training step from ``shared/training.py``
on the same model and batch; only the optimizer differs:

- ``sgd``: the clean gradient (3 passes, counting a forward on the batch as 1 and a
  backward as 2);
- ``sam``: ``optax.contrib.sam`` in opaque mode (6 passes);
- ``imbsam``: the default update, tail gradient at w recomputed (9 passes);
- ``imbsam-exact``: the tail gradient from the clean forward via
  ``value_and_tail_grads`` (8 passes, the reference implementation's count);
- ``imbsam-fast``: ``tail_capacity=k``, the two tail passes on k gathered examples
  (3 + 6k/B passes); with BatchNorm, their statistics anchored to the clean pass
  (``imbsam_jax.flax``, an approximation), else exact; a batch with more than k
  tail examples takes further chunks in a ``while`` loop;
- ``imbsam-static``: the same with ``overflow="nan"`` (no control flow in the step)
  and k the tail count of a stratified batch (``ceil(p B)``, a multiple of 8).
- ``focal-sam``: ImbSAM with Focal-SAM's weights ``(1 - pi_y)^gamma`` on every
  example, exact path (8 passes);
- ``sse-sam``: SSE-SAM's first stage, the head perturbed too (``head_rho``), exact
  path (11 passes; after its head share it is ``imbsam-exact``).

Every row records ``control_flow_ops``, the ``while`` and ``conditional`` ops of
the compiled step.

``--model resnet50`` (or ``resnext50_32x4d``) times the ImageNet models on 224x224
images and 1000 classes instead of the CIFAR ResNet; ``--dtype bfloat16`` computes
the activations in bfloat16 (parameters and optimizer state stay float32).

Times are medians over rounds in which the variants run interleaved, so that drifts
of a noisy machine hit all of them alike; ratios to SGD (and SAM) in the same process
are the numbers to compare across machines, not milliseconds.

Example::

  python examples/benchmark.py --json runs/benchmark.json
  python examples/benchmark.py --model resnet50 --dtype bfloat16 --norm batch
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import imbsam_jax
from shared import models, options, report, training
from shared.options import FRACTION, POSITIVE, option

MODELS = ("cifar", "resnet50", "resnext50_32x4d")
VARIANTS = (
  "sgd",
  "sam",
  "imbsam",
  "imbsam-exact",
  "imbsam-fast",
  "imbsam-static",
  "focal-sam",
  "sse-sam",
)
FAST = ("imbsam-fast", "imbsam-static")
PASSES = {
  "sgd": 3,
  "sam": 6,
  "imbsam": 9,
  "imbsam-exact": 8,
  "focal-sam": 8,
  "sse-sam": 11,
}


@dataclasses.dataclass(frozen=True)
class Config:
  """Options of the benchmark."""

  batch_size: int = option(128, "batch size", check=POSITIVE)
  model: str = option(
    "cifar",
    "cifar: the CIFAR ResNet of --depth and --width, 32x32 images, 10 classes; or"
    " an ImageNet model, 224x224 images, 1000 classes",
    choices=MODELS,
  )
  dtype: str = option(
    "float32",
    "activations' dtype (parameters stay float32)",
    choices=tuple(models.DTYPES),
  )
  depth: int = option(
    8,
    "CIFAR ResNet depth (32 = ResNet-32); --model cifar",
    check=(lambda d: d >= 8 and (d - 2) % 6 == 0, "must be 6n + 2 with n >= 1"),
  )
  width: int = option(16, "channels of the first stage; --model cifar", check=POSITIVE)
  norm: tuple[str, ...] = option(
    ("batch", "group"), "normalisation layers", choices=models.NORMS, flags=("--norms",)
  )
  tail_fraction: tuple[float, ...] = option(
    (0.03, 0.2),
    "share of tail examples per batch",
    check=FRACTION,
    flags=("--tail-fractions",),
  )
  variant: tuple[str, ...] = option(
    VARIANTS, "variants to time", choices=VARIANTS, flags=("--variants",)
  )
  rounds: int = option(5, "interleaved rounds", check=POSITIVE)
  steps_per_round: int = option(3, "timed steps per variant and round", check=POSITIVE)
  capacity_std: float = option(
    2.0,
    "tail_capacity = mean + this many binomial std of the tail count (x8)",
    check=options.NON_NEGATIVE,
  )
  out: str | None = option(
    None,
    "where to write the numbers: a .json file, or a directory for benchmark.json",
    flags=("--json",),
  )


def parse_args(argv: Sequence[str] | None) -> Config:
  """The checked options (exit status 2 and one line on a bad value)."""
  return options.parse(
    Config, argv, prog="benchmark.py", description=__doc__.split("\n\n")[0]
  )


def shape(args: Config) -> tuple[int, int]:
  """``(image size, number of classes)`` of the benchmarked model."""
  return (32, 10) if args.model == "cifar" else (224, 1000)


def make_batch(
  batch_size: int,
  num_tail: int,
  seed: int = 0,
  *,
  image_size: int = 32,
  num_classes: int = 10,
) -> dict[str, Any]:
  """A batch with exactly ``num_tail`` examples of the tail (the last) class."""
  rng = np.random.default_rng(seed)
  label = rng.integers(0, num_classes - 1, size=batch_size)
  label[rng.choice(batch_size, size=num_tail, replace=False)] = num_classes - 1
  image = rng.normal(size=(batch_size, image_size, image_size, 3))
  return {
    "image": jnp.asarray(image, jnp.float32),
    "label": jnp.asarray(label, jnp.int32),
  }


def per_example_loss(model: nnx.Module, batch: dict[str, Any]):
  logits = model(batch["image"]).astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  return losses, {}


def make_model(args: Config, norm: str) -> nnx.Module:
  dtype = models.DTYPES[args.dtype]
  image_size, num_classes = shape(args)
  if args.model == "cifar":
    return models.CifarResNet(
      num_classes,
      depth=args.depth,
      width=args.width,
      norm=norm,
      dtype=dtype,
      rngs=nnx.Rngs(0),
    )
  return models.create_model(
    args.model,
    num_classes=num_classes,
    input_shape=(image_size, image_size, 3),
    norm=norm,
    dtype=dtype,
    rngs=nnx.Rngs(0),
  )


def build_step(variant: str, args: Config, norm: str, capacity: int):
  """The jitted step and its initial state for one variant."""
  num_classes = shape(args)[1]
  counts = [1000] * (num_classes - 1) + [10]  # the last class is the tail
  mask_fn = imbsam_jax.tail_mask_from_counts(counts, eta=20)
  base = optax.sgd(0.01, momentum=0.9)
  method = {"sgd": "base", "sam": "sam"}.get(variant, "imbsam")
  kwargs = {"tail_capacity": capacity} if variant in FAST else {}
  if variant == "imbsam-static":
    kwargs["overflow"] = "nan"
  if variant == "focal-sam":
    mask_fn = imbsam_jax.focal_tail_mask_from_counts(counts, 3.2, lam=0.8)
  if variant == "sse-sam":
    kwargs["head_rho"] = 0.05
  tx = training.make_optimizer(method, base, rho=0.05, tail_mask_fn=mask_fn, **kwargs)
  model = make_model(args, norm)
  path = {"imbsam": "gathered"}.get(variant)
  if variant in FAST:  # BatchNorm: anchored tail statistics
    path = training.tail_path(model, capacity, "anchored")
  graphdef, state = training.init_train_state(model, tx)
  step = training.make_train_step(
    graphdef, per_example_loss, method, tx, tail_mask_fn=mask_fn, path=path or "exact"
  )
  return jax.jit(step), state


def control_flow_ops(compiled: Any) -> int:
  """The ``while`` and ``conditional`` ops of a compiled step (its HLO text).

  >>> control_flow_ops(jax.jit(lambda x: x + 1).lower(1.0).compile())
  0
  """
  return len(re.findall(r"\b(?:while|conditional)\(", compiled.as_text()))


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
  args: Config,
  norm: str,
  tail_fraction: float,
  variants: Sequence[str],
  steps: dict[tuple[Any, ...], list[Any]] | None = None,
) -> list[dict[str, Any]]:
  """Times the variants on a batch with this tail share; one row per variant.

  ``steps`` keeps the compiled steps (and their memory) between settings: only
  the fast variants depend on the tail share, through their capacities.
  """
  steps = {} if steps is None else steps
  batch_size = args.batch_size
  num_tail = round(tail_fraction * batch_size)
  # Two groups of classes, the second (share tail_fraction of the data) the tail.
  counts = np.array([1 - tail_fraction, tail_fraction]) * 1e6
  capacities = {
    "imbsam-fast": imbsam_jax.suggest_tail_capacity(
      counts, eta=counts[1] + 1, batch_size=batch_size, num_std=args.capacity_std
    ),
    "imbsam-static": min(batch_size, 8 * max(1, math.ceil(num_tail / 8))),
  }
  image_size, num_classes = shape(args)
  batch = make_batch(
    batch_size, num_tail, image_size=image_size, num_classes=num_classes
  )
  key = jax.random.key(0)
  runners = {}
  for variant in variants:
    capacity = capacities.get(variant)
    name = (norm, variant, capacity)
    if name not in steps:
      step, state = build_step(variant, args, norm, capacity)
      compiled = step.lower(state, batch, key).compile()
      steps[name] = [step, state, peak_memory_bytes(compiled)]
      steps[name].append(control_flow_ops(compiled))
    runners[variant] = steps[name]
    step, state, *_ = runners[variant]
    for _ in range(2):  # warm up
      state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    runners[variant][1] = state

  times: dict[str, list[float]] = {v: [] for v in variants}
  for _ in range(args.rounds):
    for variant in variants:
      step, state, *_ = runners[variant]
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
    capacity = capacities.get(variant)
    passes = PASSES.get(variant) or 3 + 6 * capacity / batch_size
    memory, loops = runners[variant][2:]
    rows.append(
      {
        "norm": norm,
        "tail_fraction": tail_fraction,
        "num_tail": num_tail,
        "variant": variant,
        "tail_capacity": capacity,
        "ms": 1e3 * median[variant],
        "images_per_s": batch_size / median[variant],
        "ratio_to_sgd": median[variant] / median["sgd"] if "sgd" in median else None,
        "ratio_to_sam": median[variant] / median["sam"] if "sam" in median else None,
        "passes": passes,
        "ideal_ratio_to_sgd": passes / 3,
        "peak_memory_mb": None if memory is None else memory / 2**20,
        "control_flow_ops": loops,
      }
    )
  return rows


def format_table(rows: list[dict[str, Any]]) -> str:
  header = (
    f"{'norm':6} {'tail':>5} {'variant':13} {'k':>4} {'ms':>9} {'img/s':>8}"
    f" {'x SGD':>6} {'x SAM':>6} {'ideal':>6} {'peak MB':>8} {'loops':>5}"
  )
  lines = [header, "-" * len(header)]
  fmt = lambda x, spec: "-" if x is None else format(x, spec)
  for r in rows:
    lines.append(
      f"{r['norm']:6} {r['tail_fraction']:5.0%} {r['variant']:13}"
      f" {fmt(r['tail_capacity'], '4d'):>4} {r['ms']:9.1f} {r['images_per_s']:8.0f}"
      f" {fmt(r['ratio_to_sgd'], '6.2f'):>6} {fmt(r['ratio_to_sam'], '6.2f'):>6}"
      f" {r['ideal_ratio_to_sgd']:6.2f} {fmt(r['peak_memory_mb'], '8.1f'):>8}"
      f" {r['control_flow_ops']:5d}"
    )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  rows, steps = [], {}
  for norm in args.norm:
    for fraction in args.tail_fraction:
      setting = benchmark_setting(args, norm, fraction, args.variant, steps)
      rows.extend(setting)
      print(format_table(setting), flush=True)
      print(flush=True)
  result = {
    "device": str(jax.devices()[0].device_kind),
    "platform": jax.default_backend(),
    "jax": jax.__version__,
    "batch_size": args.batch_size,
    "model": (
      f"CifarResNet-{args.depth} width {args.width}"
      if args.model == "cifar"
      else args.model
    ),
    "dtype": args.dtype,
    "rounds": args.rounds,
    "steps_per_round": args.steps_per_round,
    "rows": rows,
  }
  print(
    f"{result['model']} ({args.dtype}), batch {args.batch_size}, {result['platform']}"
    f" ({result['device']}), jax {jax.__version__}"
  )
  print(format_table(rows))
  report.write_output(args.out, "benchmark.json", result)
  return result


if __name__ == "__main__":
  options.cli(main, "benchmark.py")
