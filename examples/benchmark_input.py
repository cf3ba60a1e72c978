"""Throughput and memory of the streaming input pipeline (``shared/pipeline.py``).

Generates JPEGs (500x375, about 85 KB each, like ImageNet's photos) and a split
list in a folder, then measures, in one run:

- images/s of read + decode + RandomResizedCrop 224 + flip into batches: a plain
  single-process PIL loop against the grain loader with each ``--workers`` count
  (timed after a first batch from each worker), and W plain loops in W processes
  at once (what the machine gives W-way parallel work), in interleaved rounds;
- peak memory of one epoch of the loader (a consumer that only touches the
  batches) over lists of each ``--rss-images`` size, each in a fresh process:
  its peak RSS and the peak sampled RSS of it plus its worker processes.

Example::

  python examples/benchmark_input.py --json runs/benchmark_input.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import multiprocessing
import os
import resource
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shared import options, pipeline, report
from shared.options import NON_NEGATIVE, POSITIVE, option

try:
  import psutil
except ImportError:  # optional: without it, no peak over all processes
  psutil = None

LIST_NAME = "train.txt"


@dataclasses.dataclass(frozen=True)
class Config:
  """Options of the input benchmark."""

  images: int = option(1536, "images per timed pass", check=POSITIVE)
  batch_size: int = option(64, "batch size", check=POSITIVE)
  workers: tuple[int, ...] = option(
    (0, 1, 2), "grain worker processes of each timed loader", check=NON_NEGATIVE
  )
  threads: int = option(0, "reading threads per process", check=NON_NEGATIVE)
  rounds: int = option(3, "interleaved rounds", check=POSITIVE)
  image_size: int = option(224, "crop size", check=POSITIVE)
  rss_images: tuple[int, ...] | None = option(
    (2000, 20000), "dataset sizes of the memory runs (none: skip)", check=POSITIVE
  )
  rss_workers: int = option(2, "workers of the memory runs", check=NON_NEGATIVE)
  accelerator_rate: float = option(
    3000.0,
    "images/s one accelerator trains on (ResNet-50 bf16, A100/H100 class)",
    check=POSITIVE,
  )
  directory: str | None = option(
    None, "where to generate the images (kept; none: a temporary folder)"
  )
  out: str | None = option(
    None,
    "where to write the numbers: a .json file, or a directory for benchmark_input.json",
    flags=("--json",),
  )


def parse_args(argv: Sequence[str] | None) -> Config:
  """The checked options (exit status 2 and one line on a bad value)."""
  return options.parse(
    Config, argv, prog="benchmark_input.py", description=__doc__.split("\n\n")[0]
  )


def write_images(root: Path, count: int, seed: int = 0) -> Path:
  """``count`` distinct 500x375 JPEGs in ``root/img/`` and their list; the list.

  Photo-like: smooth random colour fields plus noise (about 85 KB at quality 90);
  10 classes, labels ``i % 10``. Files already there are kept.
  """
  rng = np.random.default_rng(seed)
  pool = []
  for _ in range(16):
    small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    smooth = np.asarray(small.resize((500, 375), Image.BICUBIC), np.float32)
    noisy = smooth + rng.normal(0, 16, smooth.shape)
    pool.append(np.clip(noisy, 0, 255).astype(np.uint8))
  (root / "img").mkdir(parents=True, exist_ok=True)
  lines = []
  for i in range(count):
    name = f"img/{i:06d}.jpg"
    if not (root / name).is_file():
      pixels = np.roll(pool[i % len(pool)], i // len(pool), axis=1)
      Image.fromarray(pixels).save(root / name, quality=90)
    lines.append(f"{name} {i % 10}")
  path = root / f"list-{count}.txt"
  path.write_text("\n".join(lines) + "\n")
  return path


def plain_loop(source: pipeline.ListSource, count: int, args: Config) -> None:
  """The baseline: each image read, decoded, cropped and flipped in turn."""
  rng, size, batch = np.random.default_rng(0), args.image_size, []
  for i in range(count):
    record = source[i % len(source)]
    image = Image.open(io.BytesIO(record["image"])).convert("RGB")
    top, left, h, w = pipeline.random_resized_crop_box(image.height, image.width, rng)
    crop = image.crop((left, top, left + w, top + h))
    pixels = np.asarray(crop.resize((size, size), Image.BILINEAR))
    batch.append(pixels[:, ::-1] if rng.random() < 0.5 else pixels)
    if len(batch) == args.batch_size:
      np.stack(batch)
      batch = []


def _loader(source: Any, args: Config, workers: int) -> pipeline.Batches:
  return pipeline.train_loader(
    source,
    global_batch_size=args.batch_size,
    seed=0,
    image_size=args.image_size,
    workers=workers,
    threads=args.threads,
    process_index=0,
    process_count=1,
  )


def time_loader(source: Any, args: Config, workers: int) -> tuple[float, float]:
  """``(startup s, steady images/s)``: a first batch from each worker, then the rest.

  The clock stops at the last batch: stopping the workers (about 1 s) is left out.
  """
  start = time.perf_counter()
  with _loader(source, args, workers) as loader:
    for _ in range(max(workers, 1)):
      next(loader)
    first = time.perf_counter()
    rest = len(loader) - loader.position
    count = sum(len(next(loader)["label"]) for _ in range(rest))
    seconds = time.perf_counter() - first
  return first - start, count / seconds


def _tree_rss(process: Any) -> int:
  """RSS of a psutil process plus its children, in bytes."""
  total = process.memory_info().rss
  for child in process.children(recursive=True):
    with contextlib.suppress(psutil.Error):  # a worker that just exited
      total += child.memory_info().rss
  return total


def _sample_peak(done: threading.Event, peak: list[int]) -> None:
  """Until ``done``: ``peak[0]`` = the largest RSS of this process tree seen."""
  me = psutil.Process()
  while not done.wait(0.02):
    peak[0] = max(peak[0], _tree_rss(me))


def epoch_memory(list_file: str, args: Config) -> dict[str, Any]:
  """Peak memory (MB) of one epoch over ``list_file``; run in a fresh process.

  ``peak_rss_mb``: this process (ru_maxrss); ``peak_worker_rss_mb``: the largest
  worker's; ``peak_total_rss_mb``: all of them together, sampled every 20 ms.
  """
  source = pipeline.ListSource(Path(list_file).parent, list_file)
  peak, done = [0], threading.Event()
  if psutil is not None:
    threading.Thread(target=_sample_peak, args=(done, peak), daemon=True).start()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  start = time.perf_counter()
  with _loader(source, args, args.rss_workers) as loader:
    batches = sum(1 for batch in loader if batch["image"].size)
  seconds = time.perf_counter() - start
  done.set()
  return {
    "images": len(source),
    "batches": batches,
    "seconds": seconds,
    "rss_before_mb": before / 1024,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "peak_worker_rss_mb": (
      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    ),
    "peak_total_rss_mb": peak[0] / 2**20 if psutil is not None else None,
  }


def _send(connection: Any, function: Any, *args: Any) -> None:
  connection.send(function(*args))


def _in_fresh_process(function: Any, *args: Any) -> Any:
  """``function(*args)`` in a spawned process (so its peak RSS is its own)."""
  context = multiprocessing.get_context("spawn")
  receive, send = context.Pipe(duplex=False)
  process = context.Process(target=_send, args=(send, function, *args))
  process.start()
  send.close()
  try:
    return receive.recv()
  except EOFError:
    raise RuntimeError(f"{function.__name__} failed (its traceback is above)") from None
  finally:
    process.join()


def _plain_pass(list_file: str, count: int, args: Config) -> None:
  """:func:`plain_loop` over ``count`` images of a list (in a pool process)."""
  path = Path(list_file)
  plain_loop(pipeline.ListSource(path.parent, path), count, args)


def measure_throughput(root: Path, args: Config) -> dict[str, Any]:
  """Medians over interleaved rounds of each variant's images/s.

  ``plain-xW``: W plain loops in W processes at once, images/s together: what
  the machine gives W-way parallel work, the ceiling of ``grain-W``
  (``plain`` for ``grain-0`` and ``grain-1``). ``of_ceiling``: the median over
  rounds of ``grain-W`` / its ceiling in the same round (robust to other load).
  """
  list_file = str(root / f"list-{args.images}.txt")
  source = pipeline.ListSource(root, list_file)
  plain_loop(source, len(source), args)  # reads every file once: page cache warm
  context = multiprocessing.get_context("spawn")
  pools = {w: context.Pool(w) for w in args.workers if w > 1}
  for w, pool in pools.items():  # imports done before timing
    pool.starmap(_plain_pass, [(list_file, 1, args)] * w)
  rates: dict[str, list[float]] = {}
  startup: dict[str, list[float]] = {}
  try:
    for _ in range(args.rounds):
      start = time.perf_counter()
      plain_loop(source, args.images, args)
      rates.setdefault("plain", []).append(args.images / (time.perf_counter() - start))
      for w, pool in pools.items():
        start = time.perf_counter()
        pool.starmap(_plain_pass, [(list_file, args.images, args)] * w)
        rate = w * args.images / (time.perf_counter() - start)
        rates.setdefault(f"plain-x{w}", []).append(rate)
      for workers in args.workers:
        seconds, rate = time_loader(source, args, workers)
        rates.setdefault(f"grain-{workers}", []).append(rate)
        startup.setdefault(f"grain-{workers}", []).append(seconds)
  finally:
    for pool in pools.values():
      pool.close()
  median = {k: statistics.median(v) for k, v in rates.items()}
  ceiling = {w: rates[f"plain-x{w}" if w > 1 else "plain"] for w in args.workers}
  return {
    "images_per_s": median,
    "ratio_to_plain": {k: v / median["plain"] for k, v in median.items()},
    "of_ceiling": {
      f"grain-{w}": statistics.median(
        g / c for g, c in zip(rates[f"grain-{w}"], ceiling[w], strict=True)
      )
      for w in args.workers
    },
    "startup_s": {k: statistics.median(v) for k, v in startup.items()},
    "all_rounds": rates,
  }


def feeding(rates: dict[str, float], args: Config) -> dict[str, Any]:
  """The best loader against one accelerator's need; cores that would meet it.

  Per-core rate: one worker's (``grain-1``; else the plain loop's). The core
  count assumes workers scale linearly (they share nothing but the disk).
  """
  best = max((k for k in rates if k.startswith("grain-")), key=rates.get)
  per_core = rates.get("grain-1", rates["plain"])
  return {
    "best_loader": best,
    "images_per_s": rates[best],
    "accelerator_images_per_s": args.accelerator_rate,
    "fraction_of_accelerator": rates[best] / args.accelerator_rate,
    "images_per_s_per_core": per_core,
    "cores_to_feed_accelerator": math.ceil(args.accelerator_rate / per_core),
  }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  with tempfile.TemporaryDirectory() as temporary:
    root = Path(args.directory or temporary)
    sizes = sorted({args.images, *(args.rss_images or ())})
    start = time.perf_counter()
    lists = {n: write_images(root, n) for n in sizes}
    print(f"{sizes[-1]} JPEGs in {root} ({time.perf_counter() - start:.0f} s)")
    throughput = measure_throughput(root, args)
    memory = [
      _in_fresh_process(epoch_memory, str(lists[n]), args)
      for n in args.rss_images or ()
    ]
  rates = throughput["images_per_s"]
  result = {
    "cpu_count": os.cpu_count(),
    "images": args.images,
    "batch_size": args.batch_size,
    "threads": args.threads,
    "rounds": args.rounds,
    "throughput": throughput,
    "feeding": feeding(rates, args),
    "memory": memory,
  }
  print(
    f"{'loader':10} {'images/s':>9} {'x plain':>8} {'of ceiling':>10} {'startup s':>10}"
  )
  fmt = lambda x, spec: "-" if x is None else format(x, spec)
  for name, rate in rates.items():
    startup = throughput["startup_s"].get(name)
    ceiling = throughput["of_ceiling"].get(name)
    print(
      f"{name:10} {rate:9.0f} {throughput['ratio_to_plain'][name]:8.2f}"
      f" {fmt(ceiling, '.0%'):>10} {fmt(startup, '.1f'):>10}"
    )
  feed = result["feeding"]
  print(
    f"{feed['best_loader']}: {feed['fraction_of_accelerator']:.0%} of"
    f" {args.accelerator_rate:.0f} images/s; {feed['images_per_s_per_core']:.0f}"
    f" images/s per core -> {feed['cores_to_feed_accelerator']} cores"
  )
  for row in memory:
    print(
      f"epoch over {row['images']} images ({row['seconds']:.0f} s): peak RSS"
      f" {row['peak_rss_mb']:.0f} MB, largest worker"
      f" {row['peak_worker_rss_mb']:.0f} MB, all processes"
      f" {fmt(row['peak_total_rss_mb'], '.0f')} MB"
    )
  report.write_output(args.out, "benchmark_input.json", result)
  return result


if __name__ == "__main__":
  options.cli(main, "benchmark_input.py")
