"""Orbax checkpoints of one training run, numbered by training step, for ``--resume``.

Checkpoint ``step`` holds ``state``, any pytree of arrays, and ``meta``, a JSON dict
(e.g. the data loader's position). Saving is asynchronous (:meth:`Checkpointer.close`
waits): do not donate the saved state's buffers while a save may read them. With
several JAX processes, every process makes the same calls on a shared directory.

A checkpoint becomes a step only once it is written whole (Orbax writes into a
temporary directory and renames it), so a write that fails (disk full) or is
killed leaves the newest complete checkpoint as it was. A failed write is a
:class:`CheckpointWriteError` at the next :meth:`~Checkpointer.save` or at
:meth:`~Checkpointer.close`, naming the checkpoint that is intact; the unfinished
write of a killed run is removed, and said so, when the directory is opened again.

>>> import tempfile, jax.numpy as jnp
>>> directory = tempfile.mkdtemp()
>>> with Checkpointer(directory) as ckpt:
...   ckpt.save(10, {"w": jnp.ones(3)}, {"loss": [0.5]})
>>> with Checkpointer(directory) as ckpt:
...   state, meta = ckpt.restore({"w": jnp.zeros(3)})
>>> state["w"].tolist(), meta
([1.0, 1.0, 1.0], {'loss': [0.5], 'step': 10})
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

#: How Orbax names a checkpoint while it is written (``STEP.orbax-checkpoint-tmp``).
UNFINISHED = "*.orbax-checkpoint-tmp*"


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written; the message names the newest intact one."""


class Checkpointer:
  """The last ``max_to_keep`` checkpoints of a run; ``fresh``: empty ``directory``."""

  def __init__(self, directory: str | os.PathLike[str], *, max_to_keep=2, fresh=False):
    self.directory = Path(directory).absolute()
    if fresh and jax.process_index() == 0 and self.directory.exists():
      shutil.rmtree(self.directory)
    if jax.process_count() > 1:  # no process may write into the old directory
      multihost_utils.sync_global_devices(f"fresh checkpoints {self.directory}")
    unfinished = sorted(p.name for p in self.directory.glob(UNFINISHED))
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._pending: int | None = None  # the step being written
    self._failed = False
    if unfinished and jax.process_index() == 0:
      print(
        f"Checkpoints in {self.directory}: removed the unfinished write of"
        f" {', '.join(unfinished)} (the run stopped while writing it); the newest"
        f" complete checkpoint is step {self.latest_step()}.",
        file=sys.stderr,
        flush=True,
      )

  def latest_step(self) -> int | None:
    """The step of the newest checkpoint, or ``None`` if there is none."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any] | None = None) -> None:
    """Saves ``state`` and ``meta`` (plus ``"step"``); files are written later."""
    meta = {**(meta or {}), "step": int(step)}
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
    )
    self._written(self._manager.wait_until_finished)  # the previous save
    self._pending = int(step)
    self._written(lambda: self._manager.save(int(step), args=args))

  def _written(self, write: Callable[[], Any]) -> None:
    """Runs ``write``; its error is a :class:`CheckpointWriteError`."""
    try:
      write()
    except Exception as error:
      self._failed = True
      self._manager.reload()  # the steps on disk
      intact = self._manager.all_steps()
      raise CheckpointWriteError(
        f"checkpoint {self._pending} could not be written to {self.directory}; "
        + (
          f"the newest complete checkpoint, step {max(intact)}, is intact:"
          " --resume continues from it."
          if intact
          else "there is no complete checkpoint."
        )
        + f" Cause: {type(error).__name__}: {str(error).strip()}"
      ) from error

  def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
    """``(state, meta)`` of checkpoint ``step`` (default: the newest).

    ``template`` (arrays or ``jax.ShapeDtypeStruct`` leaves) gives the structure,
    dtypes, shapes and shardings; FileNotFoundError if there is no checkpoint.
    """
    self._manager.wait_until_finished()
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    args = ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
    )
    restored = self._manager.restore(step, args=args)
    return restored.state, dict(restored.meta)

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's resources (a failed write:
    :class:`CheckpointWriteError`, once)."""
    try:
      if not self._failed:
        self._written(self._manager.wait_until_finished)
    finally:
      try:
        self._manager.close()
      except Exception:
        if not self._failed:
          raise

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()
