"""Small helpers shared across the package: error text, plain-data checks, versions."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .errors import ConfigError


def first_line(error: BaseException) -> str:
    """The first non-empty line of ``error``'s message, or its type name when it has none."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else type(error).__name__


def describe_error(error: BaseException) -> str:
    """One line naming an exception: ``"TypeError: bad operand"``."""
    return f"{type(error).__name__}: {first_line(error)}"


def plain_data(value: Any, what: str) -> Any:
    """``value`` after a JSON round trip (plain dicts, lists, strings, numbers only).

    Raises a ConfigError naming ``what`` when ``value`` holds anything JSON cannot represent.
    """
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{what} is not JSON-serialisable: {first_line(error)}") from None


def package_version(package: str) -> str | None:
    """The installed version of ``package``, or None."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None
