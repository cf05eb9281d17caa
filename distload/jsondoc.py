"""JSON documents users hand distload (config.json, an expert map): every parse hazard one reason.

Python's parser raises RecursionError on deep nesting, a ValueError advising
``sys.set_int_max_str_digits`` on a number of over 4300 digits, and keeps the last of
repeated keys; ``parse`` turns each into one short line. ``NaN`` and ``Infinity`` parse, as
they do for transformers: the typed readers refuse them where a field must be finite.
"""

from __future__ import annotations

import json
import sys

MAX_DEPTH = 64
"""deepest nesting accepted (real configs nest 3 levels; deep trees break json.dumps later)"""


class _RepeatedKey(ValueError):
    pass


def parse(raw: bytes, *, unique_keys: bool = False) -> object:
    """Parses the bytes of a JSON document.

    Args:
        raw: the file's bytes (UTF-8).
        unique_keys: refuse a key repeated within one object (else the last one wins).

    Returns:
        The document as dicts, lists, strings, numbers, booleans and None.

    Raises:
        ValueError: one line saying why: not UTF-8, not JSON, a number of too many digits,
            nested deeper than ``MAX_DEPTH``, or a repeated key.

    Example:
        >>> parse(b'{"a": [1, 2.5, null]}')
        {'a': [1, 2.5, None]}
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 (byte {raw[err.start]:#04x} at offset {err.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=_unique if unique_keys else None)
    except RecursionError:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep") from None
    except (json.JSONDecodeError, _RepeatedKey) as err:
        raise ValueError(str(err)) from None
    except ValueError:  # the only other one: int() of a literal over the digit limit
        raise ValueError(f"a number has more than {sys.get_int_max_str_digits()} digits") from None
    stack = [(value, 1)]
    while stack:  # iterative: a tree just under the parser's limit must not exhaust the stack here
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            if depth > MAX_DEPTH:
                raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
            stack.extend((child, depth + 1) for child in children)
    return value


def _unique(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(f"key {json.dumps(key[:40])} appears twice in one object")
        out[key] = value
    return out


def show(value: object) -> str:
    """``value`` as JSON, cut to 60 characters (an error message is one line)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:56] + " ..."


def quoted(text: str) -> str:
    """``repr`` of a string, cut to about 60 characters."""
    return repr(text) if len(text) <= 60 else repr(text[:56]) + " ..."
