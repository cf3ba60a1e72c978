"""Per-epoch Orbax checkpoints of one training run, for ``--resume``.

Checkpoint ``epoch`` (epochs completed) holds ``state``, any pytree of arrays, and
``meta``, a JSON dict. Saving is asynchronous (:meth:`Checkpointer.close` waits):
do not donate the saved state's buffers while a save may read them.

>>> import tempfile, jax.numpy as jnp
>>> directory = tempfile.mkdtemp()
>>> with Checkpointer(directory) as ckpt:
...   ckpt.save(1, {"w": jnp.ones(3)}, {"loss": [0.5]})
>>> with Checkpointer(directory) as ckpt:
...   state, meta = ckpt.restore({"w": jnp.zeros(3)})
>>> state["w"].tolist(), meta
([1.0, 1.0, 1.0], {'loss': [0.5], 'epoch': 1})
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """The last ``max_to_keep`` checkpoints of a run; ``fresh``: empty ``directory``."""

  def __init__(self, directory: str | os.PathLike[str], *, max_to_keep=2, fresh=False):
    self.directory = Path(directory).absolute()
    if fresh and self.directory.exists():
      shutil.rmtree(self.directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_epoch(self) -> int | None:
    """The epoch of the newest checkpoint, or ``None`` if there is none."""
    return self._manager.latest_step()

  def save(self, epoch: int, state: Any, meta: dict[str, Any] | None = None) -> None:
    """Saves ``state`` and ``meta`` (plus ``"epoch"``); files are written later."""
    meta = {**(meta or {}), "epoch": int(epoch)}
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
    )
    self._manager.save(int(epoch), args=args)

  def restore(self, template: Any, epoch: int | None = None) -> tuple[Any, dict]:
    """``(state, meta)`` of checkpoint ``epoch`` (default: the newest).

    ``template`` (arrays or ``jax.ShapeDtypeStruct`` leaves) gives the structure,
    dtypes, shapes and shardings; FileNotFoundError if there is no checkpoint.
    """
    self._manager.wait_until_finished()
    epoch = self.latest_epoch() if epoch is None else epoch
    if epoch is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    args = ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
    )
    restored = self._manager.restore(epoch, args=args)
    return restored.state, dict(restored.meta)

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()
