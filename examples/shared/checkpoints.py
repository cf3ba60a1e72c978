"""Per-epoch checkpoints of a training run with Orbax, for ``--resume``.

A :class:`Checkpointer` keeps the last few checkpoints of *one* run (one method,
one seed) in its own directory. Each checkpoint is Orbax step ``epoch`` (the
number of epochs completed) and holds two items:

* ``state``: any pytree of arrays, e.g. :class:`~imbsam_jax.recipes.training.TrainState`
  (Flax NNX ``State`` and Optax states are pytrees; saved with
  ``ocp.args.StandardSave``, restored into the structure, dtypes and shardings of
  a template with ``ocp.args.StandardRestore``);
* ``meta``: a JSON dict (the epoch, training history, a fingerprint of the
  configuration, the random seed), saved with ``ocp.args.JsonSave``.

Saving is asynchronous (Orbax copies the arrays off the device, then writes in a
background thread); :meth:`Checkpointer.close` waits for the last write. Do not
donate the saved state's buffers to the next step while a save may be reading
them.

Example:
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
  """The checkpoints of one run: save each epoch, restore the latest.

  Args:
    directory: where this run's checkpoints live (created if missing).
    max_to_keep: how many of the newest checkpoints to keep.
    fresh: delete any checkpoints already in ``directory`` first (a new run
      that must not mix with an old one).
  """

  def __init__(
    self,
    directory: str | os.PathLike[str],
    *,
    max_to_keep: int = 2,
    fresh: bool = False,
  ):
    self.directory = Path(directory).absolute()
    if fresh and self.directory.exists():
      shutil.rmtree(self.directory)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )

  def latest_epoch(self) -> int | None:
    """The epoch of the newest checkpoint, or ``None`` if there is none."""
    return self._manager.latest_step()

  def save(self, epoch: int, state: Any, meta: dict[str, Any] | None = None) -> None:
    """Saves ``state`` and the JSON-serialisable ``meta`` as checkpoint ``epoch``.

    ``meta`` gets an ``"epoch"`` entry. Returns once the arrays are copied off
    the device; the files are written in the background.
    """
    meta = {**(meta or {}), "epoch": int(epoch)}
    self._manager.save(
      int(epoch),
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
      ),
    )

  def restore(self, template: Any, epoch: int | None = None) -> tuple[Any, dict]:
    """Restores checkpoint ``epoch`` (default: the newest).

    Args:
      template: a pytree with the structure of the saved state; its arrays (or
        ``jax.ShapeDtypeStruct`` leaves) give the dtypes, shapes and shardings
        of the restored arrays.
      epoch: which checkpoint; ``None`` for the newest.

    Returns:
      ``(state, meta)``.

    Raises:
      FileNotFoundError: there is no checkpoint.
    """
    self._manager.wait_until_finished()
    epoch = self.latest_epoch() if epoch is None else epoch
    if epoch is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    restored = self._manager.restore(
      epoch,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
      ),
    )
    return restored.state, dict(restored.meta)

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()
