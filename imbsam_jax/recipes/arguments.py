"""Command-line helpers shared by the example scripts (argparse types, help format).

Example:
  >>> int_list("0,1, 2"), float_list("0.01,0.1"), str_list("sgd, imbsam,")
  ((0, 1, 2), (0.01, 0.1), ('sgd', 'imbsam'))
"""

from __future__ import annotations

import argparse

__all__ = ["HelpFormatter", "float_list", "int_list", "str_list"]


def int_list(text: str) -> tuple[int, ...]:
  """``"0,1,2"`` -> ``(0, 1, 2)``; an ``argparse`` type."""
  try:
    return tuple(int(s) for s in text.split(",") if s.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"expected comma-separated integers: {text!r}"
    ) from None


def float_list(text: str) -> tuple[float, ...]:
  """``"0.01,0.1"`` -> ``(0.01, 0.1)``; an ``argparse`` type."""
  try:
    return tuple(float(s) for s in text.split(",") if s.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"expected comma-separated numbers: {text!r}"
    ) from None


def str_list(text: str) -> tuple[str, ...]:
  """``"sgd, imbsam"`` -> ``("sgd", "imbsam")``; an ``argparse`` type."""
  return tuple(s.strip() for s in text.split(",") if s.strip())


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows ``(default: X)`` only where X is not None / False."""

  def _get_help_string(self, action: argparse.Action) -> str:
    if action.default is None or action.default is False:
      return action.help or ""
    return super()._get_help_string(action)
