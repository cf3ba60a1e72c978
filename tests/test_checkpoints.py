"""Checkpoints whose write fails: the newest complete one stays usable."""

import jax.numpy as jnp
import numpy as np
import pytest

from shared.checkpoints import Checkpointer, CheckpointWriteError


def state(seed: int) -> dict:  # random: Orbax compresses, so it must not shrink
  return {"w": jnp.asarray(np.random.default_rng(seed).random(50_000), jnp.float32)}


@pytest.mark.parametrize("noticed_at", ["save", "close"])
def test_failed_write_leaves_the_previous_checkpoint(
  noticed_at, tmp_path, limit_file_size, capsys
):
  """Step 2's files cannot be written (as on a full disk): the error comes at
  the next save or at close, names step 2 and the intact step 1; reopened, the
  directory drops the unfinished write, says so, and restores step 1."""
  with Checkpointer(tmp_path, max_to_keep=5) as checkpointer:
    checkpointer.save(1, state(1), {"loss": 1.0})
  checkpointer = Checkpointer(tmp_path, max_to_keep=5)
  limit_file_size(4096)
  checkpointer.save(2, state(2), {"loss": 2.0})  # written in the background
  with pytest.raises(CheckpointWriteError) as error:
    if noticed_at == "save":
      checkpointer.save(3, state(3))
    checkpointer.close()
  limit_file_size(None)
  checkpointer.close()  # the error is raised once
  assert str(error.value).startswith(
    f"checkpoint 2 could not be written to {tmp_path}; the newest complete"
    " checkpoint, step 1, is intact: --resume continues from it. Cause: "
  )
  assert "File too large" in str(error.value)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2.orbax-checkpoint-tmp"]

  capsys.readouterr()
  with Checkpointer(tmp_path) as checkpointer:
    restored, meta = checkpointer.restore(state(0))
  assert meta == {"loss": 1.0, "step": 1}
  np.testing.assert_array_equal(restored["w"], state(1)["w"])
  assert capsys.readouterr().err == (
    f"Checkpoints in {tmp_path}: removed the unfinished write of"
    " 2.orbax-checkpoint-tmp (the run stopped while writing it); the newest"
    " complete checkpoint is step 1.\n"
  )
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]
