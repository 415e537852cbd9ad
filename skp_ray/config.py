"""Job settings from three layers: a dataclass's defaults, a YAML file, then command-line flags.

Every job describes its settings as one dataclass; ``parse_settings`` turns
that dataclass into an argparse parser (each field becomes ``--field_name``,
also spelled ``--field-name``), reads ``--config file.yaml`` if given, and lets
flags override the file. Only values actually given are returned, so a job
can tell "not set" from "set to the default".
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence

import fsspec
import yaml


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


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def read_settings_file(uri: str, cls: type) -> dict:
    """The settings in a YAML file (local or fsspec URL), checked against the fields of ``cls``."""
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
    return {key: tuple(value) if isinstance(value, list) else value for key, value in settings.items()}


def _add_option(parser: argparse.ArgumentParser, field: dataclasses.Field, hint) -> None:
    names = dict.fromkeys([f"--{field.name}", f"--{field.name.replace('_', '-')}"])
    default = field.default if field.default is not dataclasses.MISSING else None
    options = dict(dest=field.name, default=argparse.SUPPRESS, help=f"default: {default}")
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
