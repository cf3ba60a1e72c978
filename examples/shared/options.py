"""One options layer: a typed config per application, and everything made from it.

An application declares its options once, as the fields of a frozen dataclass made
with :func:`option` (default, help text, checks, sweep or not). From that one
definition :func:`parse` builds the command line (one ``--flag`` per field, its
``--help`` text with the default), applies a named preset, validates every value
before any data is loaded or anything is compiled (a bad value ends the program
with one line naming the flag and exit status 2), and :func:`to_json` gives the
``config`` block of ``results.json``. Sweep options hold a tuple of values and
:func:`sweep_values` lists the grid they span.

Example:
  >>> import dataclasses
  >>> @dataclasses.dataclass(frozen=True)
  ... class Config:
  ...   preset: str | None = option(None, "named preset")
  ...   rho: tuple[float, ...] = option((0.05,), "radius", check=NON_NEGATIVE,
  ...                                   sweep=True)
  ...   epochs: int = option(30, "training epochs", check=POSITIVE)
  >>> presets = {"long": Preset("more epochs", epochs=200)}
  >>> parse(Config, ["--preset", "long", "--rho", "0.01,0.1"], presets=presets)
  Config(preset='long', rho=(0.01, 0.1), epochs=200)
  >>> sweep_values(Config(rho=(0.01, 0.1)))
  {'rho': (0.01, 0.1)}
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

#: ``(predicate, what it demands)``: a value check of :func:`option`.
Check = tuple[Callable[[Any], bool], str]
POSITIVE: Check = (lambda v: v > 0, "must be > 0")
NON_NEGATIVE: Check = (lambda v: v >= 0, "must be >= 0")
FRACTION: Check = (lambda v: 0 <= v < 1, "must lie in [0, 1)")


def at_least(bound: float) -> Check:
  """A check that a value is ``>= bound``."""
  return (lambda v: v >= bound, f"must be >= {bound:g}")


def option(
  default: Any,
  help: str,
  *,
  flags: Sequence[str] = (),
  choices: Sequence[Any] | None = None,
  check: Check | None = None,
  parse: Callable[[str], Any] | None = None,
  sweep: bool = False,
  none_word: str = "none",
) -> Any:
  """A config field: its default and everything the command line needs.

  Args:
    default: the default value (a tuple for list and sweep options).
    help: one line for ``--help``; the default is appended.
    flags: extra spellings (aliases) of ``--field-name``.
    choices: the allowed values (of each element, for tuples).
    check: ``(predicate, "must ...")``, applied to each non-None value.
    parse: turns one command-line word (or one list element) into a value;
      default: from the field's type annotation.
    sweep: the field is a tuple of values, each one a setting of the grid.
    none_word: the word that sets an optional field to ``None``.
  """
  metadata = dict(
    help=help, flags=tuple(flags), choices=choices, check=check, parse=parse,
    sweep=sweep, none_word=none_word,
  )  # fmt: skip
  return dataclasses.field(default=default, metadata=metadata)


class Preset:
  """A named set of option values, with a line saying where it comes from."""

  def __init__(self, description: str, **values: Any):
    self.description = description
    self.values = values


def flag(name: str) -> str:
  """The command-line flag of a field: ``eta_sad`` -> ``--eta-sad``."""
  return "--" + name.replace("_", "-")


def _element_type(annotation: Any) -> tuple[Any, bool, bool]:
  """``(element type, is_tuple, is_optional)`` of a field annotation."""
  optional = False
  if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is (
    typing.Union
  ):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = len(args) < len(typing.get_args(annotation))
    annotation = args[0] if len(args) == 1 else str
  if typing.get_origin(annotation) is tuple:
    return typing.get_args(annotation)[0], True, optional
  return annotation, False, optional


def _word_parser(field: dataclasses.Field, hint: Any) -> Callable[[str], Any]:
  """The function that turns one command-line word into the field's value."""
  element, is_tuple, optional = _element_type(hint)
  one = field.metadata["parse"] or element

  def parse_one(text: str) -> Any:
    try:
      return one(text.strip())
    except ValueError as e:
      if field.metadata["parse"] is not None and str(e):  # its own message
        raise argparse.ArgumentTypeError(str(e)) from None
      kind = getattr(one, "__name__", "value")
      raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None

  def parse_word(text: str) -> Any:
    if optional and text.lower() == field.metadata["none_word"]:
      return None
    if not is_tuple:
      return parse_one(text)
    values = tuple(parse_one(t) for t in text.split(",") if t.strip())
    if not values:
      raise argparse.ArgumentTypeError("expected a comma-separated list")
    return values

  return parse_word


def _show(value: Any) -> str:
  if isinstance(value, tuple):
    return ",".join(map(str, value))
  return str(value)


class _Parser(argparse.ArgumentParser):
  """Errors are one line: ``prog: error: --flag: what is wrong`` (exit 2)."""

  def error(self, message: str) -> typing.NoReturn:
    self.exit(2, f"{self.prog}: error: {message.removeprefix('argument ')}\n")


def build_parser(
  cls: type,
  *,
  presets: Mapping[str, Preset] | None = None,
  description: str | None = None,
  prog: str | None = None,
) -> argparse.ArgumentParser:
  """The command line of a config class: one flag per field, nothing defaulted.

  Every flag's default is ``argparse.SUPPRESS`` (the parsed namespace holds only
  what was given, so presets can fill in the rest); ``--help`` states the
  defaults and lists the presets.
  """
  epilog = None
  if presets:
    lines = ["presets (flags given on the command line override them):"]
    for name, preset in presets.items():
      values = ", ".join(f"{flag(k)} {_show(v)}" for k, v in preset.values.items())
      lines.append(f"  {name}: {preset.description} [{values}]")
    epilog = "\n".join(lines)
  parser = _Parser(
    prog=prog,
    description=description,
    epilog=epilog,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    argument_default=argparse.SUPPRESS,
  )
  hints = typing.get_type_hints(cls)
  for field in dataclasses.fields(cls):
    meta = field.metadata
    if "help" not in meta:
      continue
    names = (flag(field.name), *meta["flags"])
    choices = list(presets) if field.name == "preset" and presets else meta["choices"]
    text = meta["help"].replace("%", "%%")
    if choices:
      text += f"; one of {', '.join(map(str, choices))}"
      if meta["sweep"] or _element_type(hints[field.name])[1]:
        text += " (comma-separated)"
    elif meta["sweep"]:
      text += "; comma-separated values are swept"
    if hints[field.name] is bool:
      parser.add_argument(
        *names,
        dest=field.name,
        action=argparse.BooleanOptionalAction,
        help=f"{text} (default: {field.default})",
      )
      continue
    parser.add_argument(
      *names,
      dest=field.name,
      type=_word_parser(field, hints[field.name]),
      metavar=field.name.upper(),
      help=f"{text} (default: {_show(field.default)})",
    )
  return parser


def check(config: Any) -> None:
  """Raises ``ValueError("--flag: ...")`` for the first invalid value.

  Checks every field's ``choices`` and ``check``, then the config's own
  ``validate()`` method if it has one (for rules across fields).
  """
  for field in dataclasses.fields(config):
    meta = field.metadata
    value = getattr(config, field.name)
    values = value if isinstance(value, tuple) else (value,)
    name = "/".join((flag(field.name), *meta.get("flags", ())))
    if meta.get("sweep") and len(set(values)) != len(values):
      raise ValueError(f"{name}: repeated value in {_show(value)}")
    for v in values:
      if v is None:
        continue
      if meta.get("choices") and v not in meta["choices"]:
        choices = ", ".join(map(str, meta["choices"]))
        raise ValueError(f"{name}: {v!r} is not one of {choices}")
      if meta.get("check") and not meta["check"][0](v):
        raise ValueError(f"{name}: {meta['check'][1]}, got {v!r}")
  validate = getattr(config, "validate", None)
  if validate is not None:
    validate()


def parse(
  cls: type,
  argv: Sequence[str] | None = None,
  *,
  presets: Mapping[str, Preset] | None = None,
  implied_preset: Callable[[dict[str, Any]], str | None] | None = None,
  description: str | None = None,
  prog: str | None = None,
) -> Any:
  """Parses ``argv`` into a checked config; exits with status 2 on a bad value.

  The value of a field is, by priority: the command line, the preset (given as
  ``--preset`` or, if not, ``implied_preset(given)``), the field's default.
  """
  parser = build_parser(cls, presets=presets, description=description, prog=prog)
  given = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
  name = given.get("preset") or (implied_preset(given) if implied_preset else None)
  if name is not None and name not in (presets or {}):
    parser.error(f"--preset: unknown preset {name!r}; see --help")
  values = {**(presets[name].values if name else {}), **given}
  if name:
    values["preset"] = name
  try:
    config = cls(**values)
    check(config)
  except ValueError as e:
    parser.error(str(e))
  return config


def sweep_values(config: Any) -> dict[str, tuple[Any, ...]]:
  """The sweep fields of a config and their values, in field order."""
  return {
    f.name: getattr(config, f.name)
    for f in dataclasses.fields(config)
    if f.metadata.get("sweep")
  }


def from_json(cls: type, values: Mapping[str, Any]) -> Any:
  """A config from :func:`to_json` output; other keys are ignored.

  A single value given for a tuple field becomes a 1-tuple, and ``None`` there
  (a swept option a run did not use) leaves the field's default.
  """
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for field in dataclasses.fields(cls):
    if field.name not in values:
      continue
    value = values[field.name]
    if _element_type(hints[field.name])[1]:
      if value is None:
        continue
      value = tuple(value) if isinstance(value, list | tuple) else (value,)
    kwargs[field.name] = value
  return cls(**kwargs)


def cli(main: Callable[[], Any], prog: str) -> None:
  """Runs ``main()``; an error the user can fix ends in one line, not a trace.

  ``ValueError`` (options that do not fit the data) exits with status 2,
  ``FileNotFoundError`` and ``RuntimeError`` (missing runs or data) with 1.
  """
  try:
    main()
  except ValueError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    sys.exit(2)
  except (FileNotFoundError, RuntimeError) as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    sys.exit(1)


def to_json(config: Any) -> dict[str, Any]:
  """The config as a JSON-ready dict (tuples become lists)."""
  return {
    f.name: list(v) if isinstance(v := getattr(config, f.name), tuple) else v
    for f in dataclasses.fields(config)
  }
