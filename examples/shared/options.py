"""One options layer: a typed config per application, and everything made from it.

An application declares its options once, as the fields of a frozen dataclass made
with :func:`option`. From that one definition :func:`parse` builds the command line
(``--field-name`` per field, ``--help`` with the defaults and the presets), applies
a named preset, and checks every value before any data is loaded or anything
compiles: a bad value ends the program with one line naming the flag, exit status
2. :func:`to_json` gives the ``config`` block of ``results.json``; sweep options
hold a tuple of values, each a setting of the run grid (:func:`sweep_values`).

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
UNIT: Check = (lambda v: 0 <= v <= 1, "must lie in [0, 1]")


def option(
  default: Any,
  help: str,
  *,
  flags: Sequence[str] = (),
  choices: Sequence[Any] | None = None,
  check: Check | None = None,
  parse: Callable[[str], Any] | None = None,
  sweep: bool = False,
  unique: bool | None = None,
  none_word: str = "none",
  fingerprint: bool = True,
) -> Any:
  """A config field: its default and everything the command line needs.

  Args:
    default: the default (a tuple for list and sweep options).
    help: one line for ``--help``; the default is appended.
    flags: aliases of ``--field-name``.
    choices: the allowed values (of each element, for tuples).
    check: ``(predicate, "must ...")`` for each non-None value.
    parse: one command-line word (or list element) to a value; default: the
      field's type. A ``ValueError`` it raises is the error message.
    sweep: a tuple of values, each one a setting of the grid.
    unique: reject repeated values in a tuple (default: for sweeps and choices).
    none_word: the word that sets an optional field to ``None``.
    fingerprint: part of :func:`fingerprint`; ``False`` for options a run may
      resume with another value of (where and how it runs) or that each run has
      its own value of (method, seed, sweeps).
  """
  unique = sweep or choices is not None if unique is None else unique
  metadata = dict(help=help, flags=tuple(flags), choices=choices, check=check)
  metadata.update(parse=parse, sweep=sweep, unique=unique, none_word=none_word)
  metadata.update(fingerprint=fingerprint)
  return dataclasses.field(default=default, metadata=metadata)


class Preset:
  """Named option values, with a line saying where they come from."""

  def __init__(self, description: str, **values: Any):
    self.description = description
    self.values = values


def _flags(field: dataclasses.Field) -> tuple[str, ...]:
  """``("--eta-sad",)``: the flag of a field, then its aliases."""
  return ("--" + field.name.replace("_", "-"), *field.metadata.get("flags", ()))


def _kind(annotation: Any) -> tuple[Any, bool, bool]:
  """``(element type, is_tuple, is_optional)`` of a field annotation."""
  optional = False
  if isinstance(annotation, types.UnionType):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = len(args) < len(typing.get_args(annotation))
    annotation = args[0] if len(args) == 1 else str
  if typing.get_origin(annotation) is tuple:
    return typing.get_args(annotation)[0], True, optional
  return annotation, False, optional


def _word_parser(field: dataclasses.Field, annotation: Any) -> Callable[[str], Any]:
  element, is_tuple, optional = _kind(annotation)
  own = field.metadata["parse"]

  def one(text: str) -> Any:
    try:
      return (own or element)(text.strip())
    except ValueError as e:
      message = str(e) if own else f"expected {element.__name__}, got {text!r}"
      raise argparse.ArgumentTypeError(message) from None

  def word(text: str) -> Any:
    if optional and text.lower() == field.metadata["none_word"]:
      return None
    if not is_tuple:
      return one(text)
    words = text.split(",")
    if not all(w.strip() for w in words):
      raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return tuple(map(one, words))

  return word


def _show(value: Any) -> str:
  return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


class _Parser(argparse.ArgumentParser):
  """Errors are one line, ``prog: error: --flag: what is wrong`` (exit 2)."""

  def error(self, message: str) -> typing.NoReturn:
    self.exit(2, f"{self.prog}: error: {message.removeprefix('argument ')}\n")


def build_parser(
  cls: type, *, presets: Mapping[str, Preset] | None = None, **kwargs: Any
) -> argparse.ArgumentParser:
  """One flag per field; nothing defaulted, so presets can fill the rest."""
  lines = ["presets (flags given on the command line override them):"]
  for name, preset in (presets or {}).items():
    values = ", ".join(
      f"--{k.replace('_', '-')} {_show(v)}" for k, v in preset.values.items()
    )
    lines.append(f"  {name}: {preset.description} [{values}]")
  parser = _Parser(
    epilog="\n".join(lines) if presets else None,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    argument_default=argparse.SUPPRESS,
    **kwargs,
  )
  hints = typing.get_type_hints(cls)
  for field in dataclasses.fields(cls):
    meta = field.metadata
    choices = list(presets) if field.name == "preset" and presets else meta["choices"]
    text = meta["help"].replace("%", "%%")
    if choices:
      text += f"; one of {', '.join(map(str, choices))}"
    if meta["sweep"] or _kind(hints[field.name])[1]:
      text += "; comma-separated" + (" values are swept" if meta["sweep"] else "")
    text += f" (default: {_show(field.default)})"
    if hints[field.name] is bool:
      action = argparse.BooleanOptionalAction
      parser.add_argument(*_flags(field), dest=field.name, action=action, help=text)
    else:
      parse = _word_parser(field, hints[field.name])
      parser.add_argument(
        *_flags(field),
        dest=field.name,
        type=parse,
        metavar=field.name.upper(),
        help=text,
      )
  return parser


def check(config: Any) -> None:
  """Raises ``ValueError("--flag: ...")`` for the first invalid value.

  Checks each field's ``choices``, ``check`` and ``unique``, then the
  config's ``validate()`` method, if any, for rules across fields.
  """
  for field in dataclasses.fields(config):
    meta, value = field.metadata, getattr(config, field.name)
    values = value if isinstance(value, tuple) else (value,)
    name = "/".join(_flags(field))
    if meta["unique"] and len(set(values)) != len(values):
      raise ValueError(f"{name}: repeated value in {_show(value)}")
    for v in values:
      if v is not None and meta["choices"] and v not in meta["choices"]:
        raise ValueError(
          f"{name}: {v!r} is not one of {', '.join(map(str, meta['choices']))}"
        )
      if v is not None and meta["check"] and not meta["check"][0](v):
        raise ValueError(f"{name}: {meta['check'][1]}, got {v!r}")
  if hasattr(config, "validate"):
    config.validate()


def parse(
  cls: type,
  argv: Sequence[str] | None = None,
  *,
  presets: Mapping[str, Preset] | None = None,
  implied_preset: Callable[[dict[str, Any]], str | None] | None = None,
  **kwargs: Any,
) -> Any:
  """Parses ``argv`` into a checked config; exits with status 2 on a bad value.

  A field's value is the command line's, else the preset's (``--preset``, else
  ``implied_preset(given)``), else its default. ``kwargs`` go to the parser
  (``prog``, ``description``).
  """
  parser = build_parser(cls, presets=presets, **kwargs)
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
  fields = dataclasses.fields(config)
  return {f.name: getattr(config, f.name) for f in fields if f.metadata["sweep"]}


def to_json(config: Any) -> dict[str, Any]:
  """The config as a JSON-ready dict (tuples become lists)."""
  values = dataclasses.asdict(config)
  return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def fingerprint(config: Any) -> dict[str, Any]:
  """:func:`to_json` of the options that make a run what it is: those a
  checkpoint must have been made with to be resumed."""
  keep = {f.name for f in dataclasses.fields(config) if f.metadata["fingerprint"]}
  return {k: v for k, v in to_json(config).items() if k in keep}


def from_json(cls: type, values: Mapping[str, Any]) -> Any:
  """A config from :func:`to_json` output; other keys are ignored.

  A single value for a tuple field becomes a 1-tuple; ``None`` there (a swept
  option a run did not use) leaves the default.
  """
  hints, kwargs = typing.get_type_hints(cls), {}
  for field in dataclasses.fields(cls):
    value = values.get(field.name, field.default)
    if _kind(hints[field.name])[1] and value is not None:
      value = tuple(value) if isinstance(value, list | tuple) else (value,)
    kwargs[field.name] = field.default if value is None else value
  return cls(**kwargs)


def cli(main: Callable[[], Any], prog: str) -> None:
  """Runs ``main()``; errors the user can fix end in one line, not a traceback.

  ``ValueError`` (options that do not fit the data) exits with status 2,
  ``FileNotFoundError`` and ``RuntimeError`` (missing runs or data) with 1.
  """
  try:
    main()
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    sys.exit(2 if isinstance(e, ValueError) else 1)
