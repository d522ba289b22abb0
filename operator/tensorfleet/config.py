"""Typed settings objects whose every field is also a command-line flag and an environment variable.

A settings class is a frozen dataclass with ``ENV_PREFIX``; each field's metadata carries its help.
``from_env`` builds it from the environment (how pods are configured), ``click_options`` turns the
same fields into flags whose values default to the environment (how people run it). Types and choices
are checked on the way in; ranges and shapes by the class's ``validate()``, written with ``Checks``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol, TypeVar

import click


class SettingsClass(Protocol):
    ENV_PREFIX: ClassVar[str]
    __dataclass_fields__: ClassVar[dict[str, Any]]


S = TypeVar("S", bound=SettingsClass)


class ValidatedSettings(SettingsClass, Protocol):
    def validate(self) -> list[str]: ...


V = TypeVar("V", bound=ValidatedSettings)


def setting(default: Any, help: str) -> Any:
    """A settings field with its help text."""
    factory_free = default if not isinstance(default, list | dict | set) else None
    return dataclasses.field(default=factory_free, metadata={"help": help})


_QUANTITY = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[KMGTPE]i|[mkMGTPE])?")


def positive_quantity(text: str) -> bool:
    """Whether ``text`` is a Kubernetes quantity above zero (``4``, ``500m``, ``32Gi``), as a request must be."""
    return bool(_QUANTITY.fullmatch(text)) and any(ch in "123456789" for ch in text.rstrip("KMGTPEimk"))


MAX_WAIT_SECONDS = 86400  # the longest timeout, interval, retry or drain wait any setting may ask for: a day
MAX_PORT = 65535


def env_name(cls: type[SettingsClass], field_name: str) -> str:
    return f"{cls.ENV_PREFIX}{field_name.upper()}"


class Checks:
    """What a settings class's ``validate()`` found: one line per problem, naming the variable, its value and
    the limit (``TENSORFLEET_GATEWAY_PORT=70000: must be between 0 and 65535``). Write each check so that
    NaN fails it (``0 < value``, not ``not value <= 0``)."""

    def __init__(self, settings: SettingsClass) -> None:
        self.settings = settings
        self.problems: list[str] = []

    def __call__(self, name: str, ok: bool, limit: str) -> None:
        if not ok:
            value = getattr(self.settings, name)
            self.problems.append(f"{env_name(type(self.settings), name)}={value!r}: must be {limit}")


def http_url(url: str, schemes: tuple[str, ...] = ("http", "https")) -> bool:
    """Whether ``url`` has one of ``schemes``, a host, and no port or a number in 0..65535."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in 0..65535
    except ValueError:
        return False
    return parts.scheme in schemes and bool(parts.hostname)


def _kind(hint: Any) -> tuple[type, tuple[str, ...] | None, bool]:
    """(base type, choices, optional) for the annotation of a settings field."""
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
        origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return str, tuple(typing.get_args(hint)), optional
    if origin is tuple:
        return tuple, None, optional
    return hint, None, optional


def _parse(raw: str, base: type, name: str) -> Any:
    if base is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{name}={raw!r}: expected true or false")
    if base is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    try:
        return base(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected {base.__name__}") from None


def from_env(cls: type[S], environ: Mapping[str, str] | None = None, **overrides: Any) -> S:
    """Settings from ``environ`` (default: the process environment), then explicit overrides."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        name = env_name(cls, field.name)
        if name in environ:
            base, choices, _ = _kind(hints[field.name])
            value = _parse(environ[name], base, name)
            if choices and value not in choices:
                raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")
            values[field.name] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def click_options(cls: type[SettingsClass]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a click command with one option per settings field (envvar ``PREFIX_FIELD``)."""
    hints = typing.get_type_hints(cls)

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for field in reversed(dataclasses.fields(cls)):
            base, choices, _ = _kind(hints[field.name])
            flag = "--" + field.name.replace("_", "-")
            kwargs: dict[str, Any] = {
                "envvar": env_name(cls, field.name), "show_envvar": True, "default": None,
                "help": f"{field.metadata.get('help', '')} [default: {_shown(field.default)}]",
            }
            if base is bool:
                flag = f"{flag}/--no-{field.name.replace('_', '-')}"
            elif base is tuple:
                kwargs["type"] = click.STRING
            elif choices:
                kwargs["type"] = click.Choice(choices)
            else:
                kwargs["type"] = base
            command = click.option(flag, field.name, **kwargs)(command)
        return command

    return decorate


def from_click(cls: type[S], values: Mapping[str, Any]) -> S:
    """Settings from the options ``click_options`` added (unset ones keep their defaults)."""
    hints = typing.get_type_hints(cls)
    chosen: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        value = values.get(field.name)
        if value is None:
            continue
        base, _, _ = _kind(hints[field.name])
        chosen[field.name] = _parse(value, base, field.name) if base is tuple and isinstance(value, str) else value
    return cls(**chosen)


def _shown(default: Any) -> str:
    if default is None or default == ():
        return "unset"
    if isinstance(default, tuple):
        return ",".join(default)
    return str(default)


def checked_from_click(cls: type[V], values: Mapping[str, Any]) -> V:
    """``from_click``, then the settings' own ``validate()``: a usage error naming every problem, before the
    command starts anything."""
    try:
        settings = from_click(cls, values)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if problems := settings.validate():
        raise click.UsageError("; ".join(problems))
    return settings


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that refuses NaN, which passes every bound, and the infinities, which pass open ones
    (``Invalid value for '--tick': 'nan' is not a finite number.``): for every float flag of a command."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class _LazyGroup(click.Group):
    """A command group whose module is imported only when the group is used (``--help`` lists it for free)."""

    def __init__(self, name: str, target: str, short_help: str) -> None:
        super().__init__(name=name, short_help=short_help, help=short_help)
        self._target = target
        self._loaded: click.Group | None = None

    def _group(self) -> click.Group:
        if self._loaded is None:
            import importlib

            module, attribute = self._target.split(":")
            self._loaded = getattr(importlib.import_module(module), attribute)
        return self._loaded

    def list_commands(self, ctx: click.Context) -> list[str]:
        return self._group().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self._group().get_command(ctx, cmd_name)


def lazy_group(name: str, target: str, short_help: str) -> click.Group:
    """``lazy_group("usage", "tensorfleet.metering.cli:usage", "...")``: register without importing."""
    return _LazyGroup(name, target, short_help)
