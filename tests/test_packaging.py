"""Packaging: what `import imbsam_jax` pulls in, and the declared version floors."""

import pathlib
import re
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_needs_neither_flax_nor_tensorflow():
  code = (
    "import sys, imbsam_jax\n"
    "heavy = sorted(m for m in sys.modules\n"
    "  if m.split('.')[0] in ('flax', 'tensorflow', 'tensorflow_datasets'))\n"
    "print(heavy)\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == "[]"


def _floors_pinned_in_ci():
  """``{name: version}`` of the ``name==version`` pins in ``.ci/floors``."""
  text = (ROOT / ".ci" / "floors").read_text()
  return {m[1]: Version(m[2]) for m in re.finditer(r'"([\w-]+)==([\w.]+)"', text)}


def _lower_bounds(requirements):
  """``{name: version}`` of the ``>=`` bound of each requirement string."""
  bounds = {}
  for line in requirements:
    req = Requirement(line)
    for spec in req.specifier:
      if spec.operator == ">=":
        bounds[req.name] = Version(spec.version)
  return bounds


def test_floors_are_the_versions_ci_tests():
  """pyproject's lower bounds of jax, optax, numpy, flax, chex are tested by CI."""
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  extras = project["optional-dependencies"]
  core = _lower_bounds(project["dependencies"])
  examples = _lower_bounds(extras["examples"])
  test = _lower_bounds(extras["test"])
  pinned = _floors_pinned_in_ci()

  assert set(core) == {"jax", "optax", "numpy"}
  assert {name: pinned[name] for name in core} == core
  assert pinned["jaxlib"] == pinned["jax"]
  assert pinned["flax"] == examples["flax"]
  # chex is only used by the tests.
  assert "chex" not in examples
  assert pinned["chex"] == test["chex"]
