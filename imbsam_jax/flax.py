"""ImbSAM in Flax training steps: NNX and Linen helpers.

Optional: ``import imbsam_jax.flax`` needs Flax; ``import imbsam_jax`` does not.

- NNX: :func:`nnx_loss_fn` builds the pure ``loss_fn(params, batch)`` that
  ImbSAM's update evaluates at perturbed parameters, from a model and a
  per-example loss, for ``nnx.Optimizer.update(model, grads, loss_fn=..., ...)``.
- Linen: :class:`TrainState`, whose ``apply_gradients`` passes ImbSAM's keyword
  arguments on to ``tx.update``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import optax
from flax import nnx
from flax.nnx import filterlib
from flax.training import train_state

__all__ = ["TrainState", "nnx_loss_fn"]


# --- NNX ---------------------------------------------------------------------


def nnx_loss_fn(
  model: nnx.Module | nnx.GraphDef,
  per_example_loss: Callable[[Any, Any], Any],
  rest: Any = None,
  *,
  wrt: filterlib.Filter = nnx.Param,
  has_aux: bool = False,
  with_state: bool = False,
) -> Callable[[Any, Any], Any]:
  """The pure ``loss_fn(params, batch)`` of an NNX model, for ImbSAM's update.

  .. math::
    \\text{loss\\_fn}(w, b) = \\text{per\\_example\\_loss}(
    \\text{merge}(\\text{graphdef}, w, \\text{rest}), b)

  Each call merges a fresh copy of the model (``nnx.merge(..., copy=True)``;
  without the copy, Flax raises a ``TraceContextError`` under ``jit`` and
  ``grad``), so the variables the passes update, e.g. BatchNorm statistics,
  are discarded: ImbSAM's passes at ``w`` and ``w + e`` leave the model as the
  caller's clean pass left it. Build the function inside the training step, from
  the step's model, with the ``wrt`` filter of the ``nnx.Optimizer``.

  Args:
    model: the model, split here into ``graphdef``, parameters (``wrt``) and
      ``rest`` (all other variables); or a ``graphdef`` from
      ``nnx.split(model, wrt, ...)``, with ``rest`` given.
    per_example_loss: ``(model, batch) -> (B,)`` per-example losses, or
      ``-> ((B,), aux)`` with ``has_aux=True``.
    rest: with a ``graphdef``, the last part of ``nnx.split(model, wrt, ...)``.
    wrt: the filter of the parameters ``loss_fn`` takes.
    has_aux: whether ``per_example_loss`` returns ``(losses, aux)``.
    with_state: also return the copy's variables other than ``wrt`` after the
      pass (e.g. updated BatchNorm statistics), for a pure clean pass.

  Returns:
    ``loss_fn(params, batch)`` returning the ``(B,)`` losses; ``(losses, aux)``
    with ``has_aux``, ``(losses, state)`` with ``with_state``, ``(losses,
    (aux, state))`` with both.

  Example:
    >>> import jax.numpy as jnp, optax, imbsam_jax
    >>> from flax import nnx
    >>> import imbsam_jax.flax
    >>> model = nnx.Sequential(
    ...     nnx.Linear(4, 8, rngs=nnx.Rngs(0)),
    ...     nnx.BatchNorm(8, rngs=nnx.Rngs(0)),
    ...     nnx.Linear(8, 3, rngs=nnx.Rngs(0)))
    >>> mask_fn = imbsam_jax.tail_mask_from_counts([500, 50, 5], eta=20)
    >>> tx = imbsam_jax.imbsam(optax.sgd(0.1), rho=0.05, tail_mask_fn=mask_fn)
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> def per_example_loss(model, batch):
    ...   logits = model(batch["x"])
    ...   return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    >>> @nnx.jit
    ... def train_step(model, optimizer, batch):
    ...   loss_fn = imbsam_jax.flax.nnx_loss_fn(model, per_example_loss)
    ...   grads = nnx.grad(lambda m: per_example_loss(m, batch).mean())(model)
    ...   optimizer.update(
    ...       model, grads, loss_fn=loss_fn, batch=batch, labels=batch["y"])
    >>> batch = {"x": jnp.ones((6, 4)), "y": jnp.array([0, 0, 1, 2, 0, 1])}
    >>> train_step(model, optimizer, batch)
    >>> int(optimizer.step[...])
    1
  """
  if isinstance(model, nnx.GraphDef):
    if rest is None:
      raise ValueError(
        "nnx_loss_fn(graphdef, per_example_loss, rest) needs rest, the last part"
        " of nnx.split(model, wrt, ...)."
      )
    graphdef = model
  else:
    if rest is not None:
      raise TypeError("rest is taken from the model: pass it only with a graphdef.")
    graphdef, _, rest = nnx.split(model, wrt, ...)

  def loss_fn(params: Any, batch: Any) -> Any:
    copy = nnx.merge(graphdef, params, rest, copy=True)
    out = per_example_loss(copy, batch)
    if not with_state:
      return out
    state = nnx.state(copy, nnx.Not(wrt))
    if has_aux:
      losses, aux = out
      return losses, (aux, state)
    return out, state

  return loss_fn


# --- Linen -------------------------------------------------------------------


class TrainState(train_state.TrainState):
  """A Linen ``TrainState`` whose ``apply_gradients`` forwards ImbSAM's arguments.

  .. math::
    u, s' = \\text{tx.update}(g, s, w, **kw), \\quad w' = w + u

  Keywords of :meth:`apply_gradients` that name a field of the state replace it
  (as in Flax); all others (``loss_fn``, ``batch``, ``labels``, ``tail_grads``,
  ``value``...) go to ``tx.update``. Subclass it to add fields such as
  ``batch_stats``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, imbsam_jax
    >>> import flax.linen as nn
    >>> import imbsam_jax.flax
    >>> net = nn.Dense(3)
    >>> x, y = jnp.ones((6, 4)), jnp.array([0, 0, 1, 2, 0, 1])
    >>> mask_fn = imbsam_jax.tail_mask_from_counts([500, 50, 5], eta=20)
    >>> state = imbsam_jax.flax.TrainState.create(
    ...     apply_fn=net.apply,
    ...     params=net.init(jax.random.key(0), x)["params"],
    ...     tx=imbsam_jax.imbsam(optax.sgd(0.1), rho=0.05, tail_mask_fn=mask_fn))
    >>> def loss_fn(params, batch):  # per-example losses
    ...   logits = state.apply_fn({"params": params}, batch["x"])
    ...   return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    >>> batch = {"x": x, "y": y}
    >>> grads = jax.grad(lambda p: loss_fn(p, batch).mean())(state.params)
    >>> state = state.apply_gradients(
    ...     grads=grads, loss_fn=loss_fn, batch=batch, labels=batch["y"])
    >>> int(state.step)
    1
  """

  def apply_gradients(self, *, grads: Any, **kwargs: Any) -> TrainState:
    """One optimizer step: ``step + 1``, new ``params`` and ``opt_state``.

    Args:
      grads: gradients with the structure of ``params``.
      **kwargs: fields of the state to replace; all other keywords are passed
        to ``tx.update``.

    Returns:
      The updated state.
    """
    fields = {field.name for field in dataclasses.fields(self)}
    extra_args = {k: v for k, v in kwargs.items() if k not in fields}
    replace = {k: v for k, v in kwargs.items() if k in fields}
    if not extra_args:
      return super().apply_gradients(grads=grads, **replace)
    tx = self.tx
    with_args = optax.GradientTransformation(
      tx.init, functools.partial(tx.update, **extra_args)
    )
    replace.setdefault("tx", tx)  # back to tx after the step
    new = self.replace(tx=with_args)
    return super(TrainState, new).apply_gradients(grads=grads, **replace)
