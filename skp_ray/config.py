"""Job settings from three layers: a dataclass's defaults, a YAML file, then command-line flags.

Every job describes its settings as one dataclass; ``parse_settings`` turns
that dataclass into an argparse parser (each field becomes ``--field_name``,
also spelled ``--field-name``), reads ``--config file.yaml`` if given, and lets
flags override the file. Only values actually given are returned, so a job
can tell "not set" from "set to the default". ``refusals_as_messages`` is the
jobs' way of saying no to their input, and of stopping on Ctrl-C: a message,
no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import types
import typing
from collections.abc import Iterator, Sequence

import fsspec
import yaml

from skp_ray.lease import LeaseHeldError


def parse_settings(cls: type, argv: Sequence[str] | None = None, *, description: str = "") -> dict:
    """Settings for dataclass ``cls`` given in ``--config`` (YAML) and on the command line, flags winning."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of settings (keys are the option names); flags override it")
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        _add_option(parser, field, hints[field.name])
    given = vars(parser.parse_args(argv))
    config_file = given.pop("config")
    file_settings = read_settings_file(config_file, cls) if config_file else {}
    given = {key: tuple(value) if isinstance(value, list) else value for key, value in given.items()}
    settings = {**file_settings, **given}
    missing = [
        f"--{field.name}" for field in dataclasses.fields(cls) if _required(field) and field.name not in settings
    ]
    if missing:
        parser.error(f"{', '.join(missing)} required (on the command line or in the --config file)")
    return settings


@contextlib.contextmanager
def refusals_as_messages(job: str, *, resume: str) -> Iterator[None]:
    """For a job's ``__main__``. An error raised before Ray starts is the job refusing its input (a setting,
    a path, a model, an output another run holds), and its message names the input and what to do: it is
    printed alone, as ``[job] message``, and the job exits 1. Errors raised once Ray is up keep their traceback.
    A Ctrl-C prints ``[job] interrupted: <resume>`` (how a rerun carries on) and exits 130, as shells do."""
    try:
        yield
    except (ValueError, OSError, LeaseHeldError) as error:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            raise
        sys.exit(f"[{job}] {error}")
    except KeyboardInterrupt:
        print(f"[{job}] interrupted: {resume}", file=sys.stderr)
        sys.exit(130)


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def read_settings_file(uri: str, cls: type) -> dict:
    """The settings in a YAML file (local or fsspec URL), checked against the fields of ``cls`` and typed."""
    try:
        with fsspec.open(uri, "r") as f:
            settings = yaml.safe_load(f) or {}
    except FileNotFoundError as e:
        raise ValueError(f"config file {uri!r} does not exist") from e
    except yaml.YAMLError as e:
        raise ValueError(f"config file {uri!r} is not valid YAML: {e}") from e
    if not isinstance(settings, dict):
        raise ValueError(f"config file {uri!r} must hold a mapping of option names to values")
    settings = {str(key).replace("-", "_"): value for key, value in settings.items()}
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"config file {uri!r} has unknown option(s) {unknown}; known options: {sorted(known)}")
    return typed_settings(cls, settings, origin=f"config file {uri!r}")


def typed_settings(cls: type, settings: dict, *, origin: str = "settings") -> dict:
    """``settings`` with each value converted to its field's type, or a ValueError naming the key.

    YAML reads ``5e-3`` as a string and ``0 1 2`` as one string: both are
    accepted (as 0.005 and (0, 1, 2)); a value that is not of the field's type
    is refused here, on the driver, rather than in the workers.
    """
    hints = typing.get_type_hints(cls)
    problems, typed = [], {}
    for key, value in settings.items():
        try:
            typed[key] = _typed(value, hints[key])
        except (TypeError, ValueError) as error:
            problems.append(f"{key}: {error}")
    if problems:
        raise ValueError(f"{origin}: " + "; ".join(problems))
    return typed


def checked(config):
    """The dataclass ``config`` with every field converted to its declared type (see ``typed_settings``)."""
    values = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    return dataclasses.replace(config, **typed_settings(type(config), values))


def _typed(value, hint):
    if value is None:
        if _without_none(hint) is hint and hint is not type(None):
            raise ValueError("a value is required, got nothing (null)")
        return None
    hint = _without_none(hint)
    if typing.get_origin(hint) is tuple:
        return _typed_tuple(value, typing.get_args(hint))
    if hint is bool:
        return _typed_bool(value)
    if hint is int:
        return _typed_int(value)
    if hint is float:
        return _typed_float(value)
    if hint is str:
        if isinstance(value, (bool, list, tuple, dict)):
            raise ValueError(f"expected text, got {value!r}")
        return str(value)
    return value


def _typed_tuple(value, args: tuple) -> tuple:
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    items = list(items) if isinstance(items, (list, tuple)) else [items]
    if args[-1] is Ellipsis:
        element_types = [args[0]] * len(items)
    elif len(items) != len(args):
        raise ValueError(f"expected {len(args)} values, got {value!r}")
    else:
        element_types = list(args)
    return tuple(_typed(item, element_type) for item, element_type in zip(items, element_types))


def _typed_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    words = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
    if isinstance(value, (str, int)) and str(value).strip().lower() in words:
        return words[str(value).strip().lower()]
    raise ValueError(f"expected true or false, got {value!r}")


def _typed_int(value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected a whole number, got {value!r}")
    try:
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, float) and number.is_integer():
            return int(number)
        if isinstance(number, int):
            return number
    except ValueError:
        pass
    raise ValueError(f"expected a whole number, got {value!r}")


def _typed_float(value) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}") from None


def option(default=dataclasses.MISSING, help: str = "") -> dataclasses.Field:
    """A settings field with the text ``--help`` shows for it (no default: the option is required)."""
    return dataclasses.field(default=default, metadata={"help": help})


def _add_option(parser: argparse.ArgumentParser, field: dataclasses.Field, hint) -> None:
    names = dict.fromkeys([f"--{field.name}", f"--{field.name.replace('_', '-')}"])
    text = field.metadata.get("help", "")
    if _required(field):
        text += " (required)"
    elif field.default is not None:  # a None default is described in the help text itself
        default = list(field.default) if isinstance(field.default, tuple) else field.default
        text += f" (default: {default})"
    options = dict(dest=field.name, default=argparse.SUPPRESS, help=text.strip())
    hint = _without_none(hint)
    if hint is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        options.update(type=args[0], nargs="+" if args[-1] is Ellipsis else len(args))
    else:
        options["type"] = hint
    parser.add_argument(*names, **options)


def _without_none(hint):
    """``X | None`` -> ``X``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint
