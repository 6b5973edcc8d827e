"""pydantic's validation errors in the terms of the file that was read (the manifest, the listener config)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def field_path(loc: Sequence[str | int], tags: Iterable[str] = ()) -> str:
    """An error's location as the file's key path (``findings[3].prompt_rows.negative``): list indices in
    brackets, keys joined by dots, a discriminated union's ``tags`` (names of no key of the file) left out;
    empty for the top level."""
    skip = set(tags)
    path = ""
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
        elif item not in skip:
            path += f".{item}" if path else str(item)
    return path
