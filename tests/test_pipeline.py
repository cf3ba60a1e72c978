"""Tests of examples/shared/pipeline.py on generated images (no real dataset)."""

from __future__ import annotations

import io
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from data_fake_lt import TEST_PER_CLASS, TRAIN_COUNTS, write_jpeg, write_lt_dataset
from PIL import Image

from shared import metrics, pipeline

FIXTURE_TFDS_DIR = Path(__file__).parent / "data_tfds"
SIZE = 32  # image_size of the loaders in these tests
RATIO = pipeline.RATIO


@pytest.fixture(scope="module")
def lt_root(tmp_path_factory) -> Path:
  return write_lt_dataset(tmp_path_factory.mktemp("imagenet_lt"))


class MemorySource:
  """Records whose red channel is the record's index (kept by crops and resizes)."""

  num_classes = 3

  def __init__(self, n: int):
    y, x = np.mgrid[:40, :48]
    self._gradient = np.stack([x * 5, y * 6], -1).astype(np.uint8)
    self.labels = np.arange(n, dtype=np.int32) % self.num_classes

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    red = np.full((40, 48, 1), index, np.uint8)
    image = np.concatenate([red, self._gradient], -1)
    return {"image": image, "label": int(self.labels[index])}

  def __repr__(self) -> str:
    return f"MemorySource({len(self)})"


def _array_source(n: int) -> pipeline.ArraySource:
  """In-memory records whose pixels are the record's index."""
  x = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 2, 2, 1))
  return pipeline.ArraySource(x, np.arange(n, dtype=np.int32) % 3, name="ids")


@pytest.fixture(params=[MemorySource, _array_source], ids=["decoded", "arrays"])
def make_source(request):
  return request.param


def _ids(batch: dict) -> list[int]:
  """Record indices of a batch of :class:`MemorySource` images."""
  red = batch["image"][..., 0]
  assert (red == red[:, :1, :1]).all()
  return red[:, 0, 0].tolist()


def _train(source, **kwargs) -> pipeline.Batches:
  kwargs = {"global_batch_size": 8, "seed": 0, "image_size": SIZE, **kwargs}
  kwargs.setdefault("process_index", 0)
  kwargs.setdefault("process_count", 1)
  return pipeline.train_loader(source, **kwargs)


def _assert_same(batches_a, batches_b) -> None:
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ------------------------------------------------------------------ sources


def test_imagenet_lt_source_reads_list_then_images(lt_root):
  train = pipeline.open_source(f"imagenet-lt:{lt_root}", split="train")
  assert len(train) == sum(TRAIN_COUNTS) and train.num_classes == 1000
  assert train.labels.dtype == np.int32 and train.labels[-1] == len(TRAIN_COUNTS) - 1
  record = train[0]
  assert record["label"] == 0 and isinstance(record["image"], bytes)
  assert Image.open(io.BytesIO(record["image"])).size == (48, 40)
  assert repr(train).startswith("ListSource(ImageNet_LT_train.txt: 45 images, 1000")
  test = pipeline.open_source(f"imagenet-lt:{lt_root}", split="test")
  assert len(test) == TEST_PER_CLASS * len(TRAIN_COUNTS)
  with pytest.raises(ValueError, match="has splits train, val, test; got 'dev'"):
    pipeline.open_source(f"imagenet-lt:{lt_root}", split="dev")
  with pytest.raises(ValueError, match="unknown streaming dataset 'imagenet-lt'"):
    pipeline.open_source("imagenet-lt", split="train")


def test_generic_list_spec(lt_root):
  spec = f"list:{lt_root},ImageNet_LT_train.txt,ImageNet_LT_test.txt"
  assert pipeline.is_spec(spec) and not pipeline.is_spec(f"list:{lt_root},a.txt")
  train, test = (pipeline.open_source(spec, split=s) for s in ("train", "test"))
  # Classes: those of the train list, for both splits.
  assert train.num_classes == test.num_classes == len(TRAIN_COUNTS)
  assert len(test) == TEST_PER_CLASS * len(TRAIN_COUNTS)
  with pytest.raises(ValueError, match="has splits train, test; got 'val'"):
    pipeline.open_source(spec, split="val")


def test_list_reads_no_image_until_asked(tmp_path):
  """Construction reads the list only; a missing image fails when read, by line."""
  (tmp_path / "a.txt").write_text("x/1.jpg 0\n\nx/missing.jpg 1\n")
  write_jpeg(tmp_path / "x/1.jpg", np.random.default_rng(0))
  source = pipeline.ListSource(tmp_path, tmp_path / "a.txt")
  assert len(source) == 2 and source.num_classes == 2
  assert source[0]["label"] == 0
  with pytest.raises(FileNotFoundError, match=r"a\.txt line 3: no file .*missing"):
    source[1]


def test_grayscale_and_cmyk_jpegs_become_rgb(tmp_path):
  """ImageNet holds a few grayscale and CMYK JPEGs: batches are RGB all the same."""
  pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 4), dtype=np.uint8)
  Image.fromarray(pixels[..., 0]).save(tmp_path / "gray.jpg")
  Image.fromarray(pixels, "CMYK").save(tmp_path / "cmyk.jpg")
  (tmp_path / "list.txt").write_text("gray.jpg 0\ncmyk.jpg 1\n")
  source = pipeline.ListSource(tmp_path, tmp_path / "list.txt")
  batch = next(_train(source, global_batch_size=2))
  assert batch["image"].shape == (2, SIZE, SIZE, 3)
  evaluated = next(pipeline.eval_loader(source, global_batch_size=2, image_size=SIZE))
  assert evaluated["image"].shape == (2, SIZE, SIZE, 3)


@pytest.mark.parametrize(
  "text,match",
  [
    ("a.jpg\n", r"line 1: expected 'relative/path label'"),
    ("a.jpg 0\nb.jpg x\n", r"line 2: expected .* got 'b.jpg x'"),
    ("a.jpg -1\n", "non-negative integer label"),
    ("a.jpg 0\nb.jpg 1000\n", r"line 2: label 1000 is not below the 1000 classes"),
    ("\n", "names no images"),
  ],
)
def test_list_validation(tmp_path, text, match):
  (tmp_path / "ImageNet_LT_train.txt").write_text(text)
  with pytest.raises(ValueError, match=match):
    pipeline.open_source(f"imagenet-lt:{tmp_path}", split="train")


def test_missing_list_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"Places_LT_val\.txt does not exist"):
    pipeline.open_source(f"places-lt:{tmp_path}", split="val")


def test_class_counts_from_list_only(tmp_path):
  """Counts and Many/Medium/Few splits from the train list; no image exists."""
  counts = [150, 101, 100, 20, 19, 0, 1]
  lines = [f"train/c{c}/{i}.jpg {c}" for c, n in enumerate(counts) for i in range(n)]
  (tmp_path / "Places_LT_train.txt").write_text("\n".join(lines))
  spec = f"places-lt:{tmp_path}"
  result = pipeline.class_counts(spec)
  assert result.dtype == np.int64 and result.shape == (365,)
  np.testing.assert_array_equal(result[:7], counts)
  source = pipeline.open_source(spec, split="train")
  np.testing.assert_array_equal(pipeline.class_counts(source), result)
  splits = metrics.class_splits(result[:7])
  assert splits["many"].tolist() == [1, 1, 0, 0, 0, 0, 0]
  assert splits["medium"].tolist() == [0, 0, 1, 1, 0, 0, 0]
  assert splits["few"].tolist() == [0, 0, 0, 0, 1, 1, 1]


# -------------------------------------------------------------- transforms


def test_random_resized_crop_box_ranges():
  rng = np.random.default_rng(0)
  for height, width in [(375, 500), (40, 48), (500, 200)]:
    for _ in range(200):
      top, left, h, w = pipeline.random_resized_crop_box(height, width, rng)
      assert 0 <= top <= height - h and 0 <= left <= width - w and h > 0 and w > 0
      # Rounding of h and w widens the bounds slightly on small images.
      assert 0.08 * 0.9 <= h * w / (height * width) <= 1
      assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


@pytest.mark.parametrize(
  "shape,ratio,box",
  [
    ((10, 100), RATIO, (0, 43, 10, 13)),  # too wide: widest allowed ratio
    ((100, 10), RATIO, (43, 0, 13, 10)),  # too tall: tallest allowed ratio
    ((30, 30), (2, 3), (7, 0, 15, 30)),
  ],
)
def test_random_resized_crop_falls_back_to_centre(shape, ratio, box):
  """The whole area at an aspect ratio the image lacks: every try fails."""
  rng = np.random.default_rng(0)
  assert pipeline.random_resized_crop_box(*shape, rng, (1.0, 1.0), ratio) == box


def test_eval_example_is_resize_then_centre_crop(lt_root):
  source = pipeline.open_source(f"imagenet-lt:{lt_root}", split="test")
  example = pipeline._EvalExample(source, SIZE)((0, 3))
  image = Image.open(io.BytesIO(source[3]["image"])).convert("RGB")
  # 40x48, shorter side to round(32 * 256 / 224) = 37: 37x44, crop rows 2..33.
  expected = np.asarray(image.resize((44, 37), Image.BILINEAR))[2:34, 6:38]
  np.testing.assert_array_equal(example["image"], expected)
  assert example["label"] == source.labels[3] and example["valid"]


# ------------------------------------------------------------------ loaders


def test_train_loader_batches_and_determinism(lt_root):
  source = pipeline.open_source(f"imagenet-lt:{lt_root}", split="train")
  loader = _train(source, num_epochs=2)
  assert loader.steps_per_epoch == 45 // 8 and len(loader) == 10
  batches = list(loader)
  assert len(batches) == 10 and loader.position == 10
  assert batches[0]["image"].shape == (8, SIZE, SIZE, 3)
  assert batches[0]["image"].dtype == np.uint8
  assert batches[0]["label"].dtype == np.int32
  _assert_same(batches, list(_train(source, num_epochs=2)))
  other = next(_train(source, seed=1))
  assert not np.array_equal(other["image"], batches[0]["image"])


def test_epochs_are_whole_batches_of_fresh_permutations(make_source):
  source = make_source(21)
  ids = [_ids(b) for b in _train(source, num_epochs=3)]
  epochs = [ids[2 * e] + ids[2 * e + 1] for e in range(3)]  # 21 // 8 = 2 steps
  for epoch in epochs:
    assert len(set(epoch)) == 16  # 5 records left out, others once
  assert len({tuple(e) for e in epochs}) == 3
  unshuffled = [_ids(b) for b in _train(source, shuffle=False, num_epochs=2)]
  assert unshuffled == [list(range(8)), list(range(8, 16))] * 2


def test_processes_split_each_global_batch(make_source):
  """2 processes: disjoint rows covering the epoch; together one process's batch."""
  source = make_source(40)
  one = list(_train(source, num_epochs=2))
  halves = [
    list(_train(source, num_epochs=2, process_index=p, process_count=2)) for p in (0, 1)
  ]
  for whole, first, second in zip(one, *halves, strict=True):
    assert first["image"].shape[0] == second["image"].shape[0] == 4
    joined = {k: np.concatenate([first[k], second[k]]) for k in whole}
    _assert_same([joined], [whole])
  for epoch in (slice(0, 5), slice(5, 10)):
    shards = [{i for batch in h[epoch] for i in _ids(batch)} for h in halves]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(40))


def test_resume_mid_epoch_sees_the_same_batches(make_source):
  source = make_source(30)
  uninterrupted = list(_train(source, num_epochs=3))  # 3 steps per epoch
  with _train(source, num_epochs=3) as killed:
    _assert_same(list(itertools.islice(killed, 4)), uninterrupted[:4])
    state = json.loads(json.dumps(killed.get_state()))
  assert state["position"] == 4
  resumed = _train(source, num_epochs=3)
  resumed.set_state(state)
  _assert_same(list(resumed), uninterrupted[4:])
  # The state is the same on every process; it refuses another loader.
  second = _train(source, num_epochs=3, process_index=1, process_count=2)
  second.set_state(state)
  assert second.position == 4
  with pytest.raises(ValueError, match=r"another loader: saved for .*seed=0"):
    _train(source, num_epochs=3, seed=1).set_state(state)


def test_workers_give_the_same_batches_and_resume(lt_root):
  """grain worker processes (2) make whole batches: same stream as in-process."""
  source = pipeline.open_source(f"imagenet-lt:{lt_root}", split="train")
  expected = list(_train(source, num_epochs=2))
  with _train(source, num_epochs=2, workers=2, threads=1) as loader:
    first = list(itertools.islice(loader, 3))
    state = loader.get_state()
  _assert_same(first, expected[:3])
  resumed = _train(source, num_epochs=2, workers=1)
  resumed.set_state(state)
  _assert_same(list(resumed), expected[3:])


def test_eval_loader_pads_to_one_shape(lt_root):
  source = pipeline.open_source(f"imagenet-lt:{lt_root}", split="test")  # 10 images
  loaders = [
    pipeline.eval_loader(
      source, global_batch_size=4, image_size=SIZE, process_index=p, process_count=2
    )
    for p in (0, 1)
  ]
  batches = [list(loader) for loader in loaders]
  assert [len(b) for b in batches] == [3, 3]  # ceil(10 / 4) on every process
  for p in (0, 1):
    assert all(b["image"].shape == (2, SIZE, SIZE, 3) for b in batches[p])
  # Global batch 2 holds records 8, 9 (process 0) and padding (process 1).
  assert batches[0][2]["valid"].tolist() == [True, True]
  assert batches[1][2]["valid"].tolist() == [False, False]
  assert not batches[1][2]["image"].any()
  rows = [
    np.concatenate([batches[p][s][k] for s in range(3) for p in (0, 1)])
    for k in ("image", "label", "valid")
  ]
  images, labels, valid = rows
  np.testing.assert_array_equal(labels[valid], source.labels)
  examples = [pipeline._EvalExample(source, SIZE)((i, i))["image"] for i in range(10)]
  np.testing.assert_array_equal(images[valid], np.stack(examples))
  # Per-class test counts: summed over processes' valid rows.
  counts = np.bincount(labels[valid], minlength=len(TRAIN_COUNTS))
  assert counts.tolist() == [TEST_PER_CLASS] * len(TRAIN_COUNTS)


def test_array_source_batches_are_numpy_permutations_as_stored():
  """Epoch e of an in-memory source: ``default_rng((seed, e)).permutation(N)``,
  sliced into whole batches, images and labels as stored (float32 here)."""
  x = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1) / 10
  source = pipeline.ArraySource(x, np.arange(10, dtype=np.int32))
  batches = list(_train(source, global_batch_size=4, seed=3, num_epochs=2))
  assert [b["image"].dtype for b in batches] == [np.float32] * 4
  for epoch in range(2):
    order = np.random.default_rng((3, epoch)).permutation(10)[:8]
    got = np.concatenate([b["label"] for b in batches[2 * epoch : 2 * epoch + 2]])
    np.testing.assert_array_equal(got, order)
  np.testing.assert_array_equal(
    batches[0]["image"].ravel(), x[batches[0]["label"]].ravel()
  )
  with pytest.raises(ValueError, match="differ in length"):
    pipeline.ArraySource(x, np.arange(3))


def test_array_source_eval_batches_pad_per_process():
  source = pipeline.ArraySource(np.arange(1, 11, dtype=np.uint8), np.arange(10))
  assert source.num_classes == 10
  parts = [
    list(
      pipeline.eval_loader(
        source, global_batch_size=4, process_index=p, process_count=2
      )
    )
    for p in (0, 1)
  ]
  assert [len(p) for p in parts] == [3, 3]
  rows = {
    k: np.concatenate([parts[p][s][k] for s in range(3) for p in (0, 1)])
    for k in ("image", "label", "valid")
  }
  assert rows["valid"].tolist() == [True] * 10 + [False] * 2
  np.testing.assert_array_equal(rows["image"], [*range(1, 11), 0, 0])
  np.testing.assert_array_equal(rows["label"], [*range(10), 0, 0])


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(global_batch_size=50), "global_batch_size=50 > 45 images"),
    (dict(global_batch_size=6, process_count=4), "multiple of process_count"),
    (dict(process_index=2, process_count=2), "0 <= process_index < process_count"),
    (dict(seed=-1), r"seed in \[0, 2\*\*32\)"),
  ],
)
def test_train_loader_errors(lt_root, kwargs, match):
  source = pipeline.open_source(f"imagenet-lt:{lt_root}", split="train")
  with pytest.raises(ValueError, match=match):
    _train(source, **kwargs)


# -------------------------------------------------------------------- TFDS


def test_i_naturalist2018_with_mock_data(mock_data, tmp_path):
  """The spec on ``tfds.testing.mock_data``: records, classes, labels, a batch.

  mock_data replaces ``as_data_source``: ``tfds.data_source`` returns random
  examples (PNG-encoded images of random sizes, random labels) and reads no
  file, so the label cache is not written (the cifar10 fixture test covers it).
  """
  with mock_data(num_examples=12):
    train = pipeline.open_source("i_naturalist2018", split="train", data_dir=tmp_path)
    val = pipeline.open_source("i_naturalist2018", split="test", data_dir=tmp_path)
    record = train[0]
    counts = pipeline.class_counts(train)
    batch = next(_train(train, global_batch_size=4, shuffle=False))
  assert isinstance(train, pipeline.TfdsSource) and len(train) == 12
  assert train.num_classes == 8142 and val.split == "validation"
  assert repr(train) == "TfdsSource(i_naturalist2018, train: 12 images)"
  assert isinstance(record["image"], bytes) and isinstance(record["label"], int)
  assert counts.shape == (8142,) and counts.sum() == 12
  assert batch["image"].shape == (4, SIZE, SIZE, 3)
  np.testing.assert_array_equal(batch["label"], train.labels[:4])
  assert not list(tmp_path.iterdir())


def test_tfds_array_record_fixture_labels_cached(tmp_path, monkeypatch):
  """Real array_record files (tests/data_tfds, cifar10) read without TensorFlow."""
  tfds = pytest.importorskip("tensorflow_datasets")
  if str(tfds.builder("cifar10").version) != "3.0.2":
    pytest.skip("fixture is cifar10 3.0.2; regenerate tests/data_tfds")
  shutil.copytree(FIXTURE_TFDS_DIR, tmp_path / "tfds")
  source = pipeline.TfdsSource("cifar10", "train", data_dir=tmp_path / "tfds")
  assert source.num_classes == 10
  image = Image.open(io.BytesIO(source[0]["image"]))  # encoded, as stored
  assert image.format == "PNG" and image.size == (32, 32)
  by_record = [source[i]["label"] for i in range(len(source))]
  assert source.labels.tolist() == by_record
  assert (tmp_path / "tfds/cifar10/3.0.2/label-train.npy").is_file()
  # A later reader loads the cached labels without reading a record.
  again = pipeline.TfdsSource("cifar10", "train", data_dir=tmp_path / "tfds")
  monkeypatch.setattr(pipeline.TfdsSource, "__getitem__", None)
  np.testing.assert_array_equal(pipeline.class_counts(again), np.bincount(by_record))


def test_imagenet2012_lt_finds_records_by_file_name(mock_data, tmp_path):
  """The ImageNet-LT lists over TFDS imagenet2012 records (mocked: as stored,
  in TFDS's shuffled order, ``file_name`` without the list's folders)."""
  names = {
    "train": [f"n{c:08d}_{i}.JPEG" for c in range(3) for i in range(3)][::-1],
    "validation": [f"ILSVRC2012_val_{i:08d}.JPEG" for i in (7, 3, 5)],
  }
  stored = {
    split: [{"image": n.encode(), "label": 0, "file_name": n} for n in split_names]
    for split, split_names in names.items()
  }
  (tmp_path / "ImageNet_LT_train.txt").write_text(
    "train/n00000002/n00000002_1.JPEG 2\ntrain/n00000000/n00000000_0.JPEG 0\n"
  )
  (tmp_path / "ImageNet_LT_test.txt").write_text(
    "val/n00000001/ILSVRC2012_val_00000005.JPEG 1\n"
  )
  (tmp_path / "ImageNet_LT_val.txt").write_text(
    "train/n00000001/n00000001_2.JPEG 1\ntrain/n00000001/n00000001_9.JPEG 1\n"
  )
  as_data_source = lambda builder, split, decoders=None: stored[split]
  with mock_data(as_data_source_fn=as_data_source):
    spec = f"imagenet2012-lt:{tmp_path}"
    train = pipeline.open_source(spec, split="train", data_dir=tmp_path)
    test = pipeline.open_source(spec, split="test", data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"val\.txt line 2: no imagenet2012 record"):
      pipeline.open_source(spec, split="val", data_dir=tmp_path)
  assert [train[i] for i in range(2)] == [
    {"image": b"n00000002_1.JPEG", "label": 2},
    {"image": b"n00000000_0.JPEG", "label": 0},
  ]
  assert test[0] == {"image": b"ILSVRC2012_val_00000005.JPEG", "label": 1}
  assert train.num_classes == 1000
  assert pipeline.class_counts(train)[:3].tolist() == [1, 0, 1]


def test_tfds_unprepared_is_explained(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(RuntimeError, match=r"not prepared as array_record .*tfds build"):
    pipeline.open_source("i_naturalist2018", split="train", data_dir=tmp_path)


# --------------------------------------------------------------- benchmark


def test_benchmark_input_runs_small(tmp_path, capsys):
  """examples/benchmark_input.py end to end on a few small images (not timed)."""
  import benchmark_input  # examples/ is on the path (pyproject.toml)

  argv = ["--images=24", "--batch-size=8", "--image-size=16", "--workers=0"]
  argv += ["--rounds=1", "--rss-images=16", "--rss-workers=0"]
  argv += [f"--directory={tmp_path}", f"--json={tmp_path / 'out.json'}"]
  result = benchmark_input.main(argv)
  assert json.loads((tmp_path / "out.json").read_text()) == result
  assert set(result["throughput"]["images_per_s"]) == {"plain", "grain-0"}
  assert result["throughput"]["ratio_to_plain"]["plain"] == 1.0
  assert result["feeding"]["cores_to_feed_accelerator"] >= 1
  (memory,) = result["memory"]
  assert memory["images"] == 16 and memory["batches"] == 2
  assert memory["peak_rss_mb"] > 0
  assert len(list((tmp_path / "img").iterdir())) == 24
  assert "grain-0" in capsys.readouterr().out


def test_list_files_checked_and_undecodable_images_named(tmp_path):
  """check_files counts the missing files and names the first; an image that
  does not decode fails with its list line and path, not a bare PIL error."""
  lines = [f"x/{i}.jpg {i % 2}" for i in range(6)]
  (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
  for i in (0, 2, 3):
    write_jpeg(tmp_path / f"x/{i}.jpg", np.random.default_rng(i))
  source = pipeline.ListSource(tmp_path, tmp_path / "list.txt")
  pattern = r"3 of the 6 files of .*list\.txt are missing, e\.g\. .*list\.txt line 2: "
  with pytest.raises(FileNotFoundError, match=pattern + r".*x/1\.jpg"):
    source.check_files()
  for i in (1, 4, 5):
    write_jpeg(tmp_path / f"x/{i}.jpg", np.random.default_rng(i))
  (tmp_path / "x/4.jpg").write_bytes(b"not a jpeg")
  source.check_files()  # every file exists now
  match = r"list\.txt line 5: .*x/4\.jpg: cannot decode the image"
  with pytest.raises(ValueError, match=match):
    list(_train(source, global_batch_size=6))
  with pytest.raises(ValueError, match=match):
    list(pipeline.eval_loader(source, global_batch_size=6, image_size=SIZE))


def test_skip_unreadable(tmp_path, monkeypatch, caplog):
  """A training example takes the next record that decodes and a test image
  becomes padding; each skip is logged and counted, in worker processes too."""
  lines = [f"x/{i}.jpg {i}" for i in range(6)]
  (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
  for i in range(6):
    write_jpeg(tmp_path / f"x/{i}.jpg", np.random.default_rng(i))
  (tmp_path / "x/4.jpg").write_bytes(b"not a jpeg")
  source = pipeline.ListSource(tmp_path, tmp_path / "list.txt")
  for workers in (0, 1):
    loader = _train(
      source, global_batch_size=6, num_epochs=2, workers=workers, skip_unreadable=True
    )
    with loader:
      batches = list(loader)
    assert loader.skipped == 2 and loader.get_state()["position"] == 2
    for batch in batches:  # record 4 (label 4) is read as record 5; no extra key
      assert sorted(batch) == ["image", "label"]
      assert sorted(batch["label"].tolist()) == [0, 1, 2, 3, 5, 5]
  assert "x/4.jpg: cannot decode the image" in caplog.text
  copy = tmp_path / "copy"  # the same list with x/4.jpg a copy of x/5.jpg
  shutil.copytree(tmp_path / "x", copy / "x")
  shutil.copy(tmp_path / "x/5.jpg", copy / "x/4.jpg")
  (clean,) = _train(
    pipeline.ListSource(copy, tmp_path / "list.txt"), global_batch_size=6
  )
  (skipping,) = _train(source, global_batch_size=6, skip_unreadable=True)
  np.testing.assert_array_equal(clean["image"], skipping["image"])  # same crops
  assert (clean["label"] != skipping["label"]).sum() == 1
  loader = pipeline.eval_loader(
    source, global_batch_size=4, image_size=SIZE, skip_unreadable=True
  )
  batches = list(loader)
  assert np.concatenate([b["valid"] for b in batches]).tolist() == [
    *[True] * 4,
    False,  # record 4
    True,
    False,
    False,  # padding
  ]
  assert loader.skipped == 1 and "skipped" not in batches[0]
  monkeypatch.setattr(pipeline, "MAX_SKIPPED", 1)
  with pytest.raises(ValueError, match="1 consecutive records do not decode"):
    list(_train(source, global_batch_size=6, skip_unreadable=True))
