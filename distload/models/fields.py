"""Typed, range-checked reads of config.json fields: a bad value is one ConfigError naming the
field and the value.

Integers must be JSON integers: ``4.0``, ``"4"``, ``true`` and ``1.9`` are refused (``int()``
made ``1.9`` a 1 without a word). Booleans must be ``true`` / ``false`` (the string
``"false"`` is true to Python), numbers finite JSON numbers, strings strings, lists lists of the
right length and kind. ``null`` stands for the default only where transformers declares the
field optional (``int | None``).
"""

from __future__ import annotations

import math
from typing import Mapping

from ..errors import ConfigError
from ..jsondoc import quoted, show

MAX_SIZE = 2**24
"""largest count or width (16,777,216): real vocabularies stay under 2**19 and widths under
2**17; a weight of two such sizes has under 2**48 elements, so no shape overflows"""

MAX_EXPERTS = 2**16
"""largest expert count (the largest real models have a few hundred)"""

MAX_VALUES = 2**48
"""most elements the experts of one layer may hold (experts x width x hidden)"""

REQUIRED = object()
"""the default of a field the model cannot do without"""


class Fields:
    """Reads the fields of one config.json object (or of an object inside it, ``prefix`` naming it).

    Example:
        >>> f = Fields({"model_type": "llama", "hidden_size": 64, "tie_word_embeddings": "false"})
        >>> f.integer("hidden_size"), f.integer("head_dim", 16, nullable=True)
        (64, 16)
        >>> f.flag("tie_word_embeddings", False)
        Traceback (most recent call last):
        ...
        distload.errors.ConfigError: config.json tie_word_embeddings must be true or false, got "false"
    """

    __slots__ = ("values", "prefix", "needed_by")

    def __init__(self, values: Mapping, *, prefix: str = "", needed_by: str | None = None) -> None:
        self.values = values
        self.prefix = prefix
        mt = values.get("model_type")
        self.needed_by = needed_by or f"model_type {quoted(mt) if isinstance(mt, str) else show(mt)}"

    def error(self, key: str, wanted: str, value: object) -> ConfigError:
        """The error for a value of ``key`` that is not ``wanted``."""
        return ConfigError(f"config.json {self.prefix}{key} must be {wanted}, got {show(value)}")

    def absent(self, key: str) -> ConfigError:
        """The error for a required ``key`` that is not there."""
        return ConfigError(f"config.json has no {quoted(self.prefix + key)}, which {self.needed_by} needs")

    def _present(self, key: str, default: object) -> bool:
        if key in self.values:
            return True
        if default is REQUIRED:
            raise self.absent(key)
        return False

    def integer(self, key: str, default: object = REQUIRED, *, minimum: int = 1, maximum: int | None = None,
                cap: int = MAX_SIZE, nullable: bool = False):
        """A JSON integer in ``minimum..maximum`` (``maximum``: a limit the model sets; else at most ``cap``).

        ``default`` when absent, and when null if ``nullable``.
        """
        if not self._present(key, default):
            return default
        value = self.values[key]
        if value is None and nullable and default is not REQUIRED:
            return default
        top = cap if maximum is None else maximum
        if type(value) is int and minimum <= value <= top:
            return value
        if maximum is not None:
            wanted = f"an integer in {minimum}..{maximum}"
        elif type(value) is int and value > cap:
            raise self.error(key, f"at most {cap}", value)
        else:
            wanted = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise self.error(key, wanted + (" or null" if nullable else ""), value)

    def flag(self, key: str, default: object = REQUIRED, *, nullable: bool = False):
        """JSON ``true`` or ``false``; null (if ``nullable``) is false, as transformers' ``if config.x:`` reads it."""
        if not self._present(key, default):
            return default
        value = self.values[key]
        if value is None and nullable:
            return False
        if type(value) is bool:
            return value
        raise self.error(key, "true or false" + (" or null" if nullable else ""), value)

    def number(self, key: str, default: object = REQUIRED, *, positive: bool = True):
        """A finite JSON number (positive, unless ``positive`` is False), as a float."""
        if not self._present(key, default):
            return default
        value = self.values[key]
        if type(value) in (int, float):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond any float
                number = math.inf
            if math.isfinite(number) and (number > 0 or not positive):
                return number
        raise self.error(key, "a positive number" if positive else "a finite number", value)

    def text(self, key: str, default: object = REQUIRED, *, choices: tuple[str, ...] | None = None):
        """A JSON string, one of ``choices`` when given."""
        if not self._present(key, default):
            return default
        value = self.values[key]
        if not isinstance(value, str):
            raise self.error(key, "a string", value)
        if choices is not None and value not in choices:
            raise ConfigError(f"config.json {self.prefix}{key} {quoted(value)} is not supported "
                              f"(supported: {', '.join(choices)})")
        return value

    def section(self, key: str, *, needed_by: str) -> "Fields | None":
        """The object at ``key`` as Fields; None when it is absent, null or empty."""
        value = self.values.get(key)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise self.error(key, "an object or null", value)
        return Fields(value, prefix=f"{self.prefix}{key}.", needed_by=needed_by) if value else None

    def integers(self, key: str, default: tuple[int, ...], *, maximum: int, what: str,
                 nullable: bool = False) -> tuple[int, ...]:
        """A JSON list of integers in ``0..maximum`` (``what`` names them in the message)."""
        if not self._present(key, default):
            return default
        value = self.values[key]
        if value is None and nullable and default is not REQUIRED:
            return default
        if isinstance(value, list) and all(type(v) is int and 0 <= v <= maximum for v in value):
            return tuple(value)
        raise self.error(key, f"a list of {what} in 0..{maximum}" + (" or null" if nullable else ""), value)

    def strings(self, key: str, default: tuple[str, ...], *, length: int, choices: tuple[str, ...],
                nullable: bool = False) -> tuple[str, ...]:
        """A JSON list of ``length`` strings (one per layer), each one of ``choices``."""
        if not self._present(key, default):
            return default
        value = self.values[key]
        if value is None and nullable and default is not REQUIRED:
            return default
        strings = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if not strings or len(value) != length:
            wanted = f"a list of {length} strings (one per layer)" + (" or null" if nullable else "")
            if strings:
                raise ConfigError(f"config.json {self.prefix}{key} must be {wanted}, got {len(value)}")
            raise self.error(key, wanted, value)
        for i, item in enumerate(value):
            if item not in choices:
                raise ConfigError(f"config.json {self.prefix}{key}[{i}] {quoted(item)} is not supported "
                                  f"(supported: {', '.join(choices)})")
        return tuple(value)

    def at_most(self, expression: str, value: int, limit: int) -> None:
        """Refuses a size derived from several fields (``expression`` names them) over ``limit``."""
        if value > limit:
            raise ConfigError(f"config.json {expression} must be at most {limit}, got {value}")
