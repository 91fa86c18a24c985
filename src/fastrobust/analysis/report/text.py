"""Words of the report: plurals, and numbers of settings as a person writes them."""

from __future__ import annotations

from typing import Any

from fastrobust.core.values import pixel_text


def plural(count: int, word: str, many: str | None = None) -> str:
    """``"1 run"``, ``"2 runs"``; ``many`` for an irregular plural (``plural(2, "class", "classes")``)."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


def key_text(value: Any) -> str:
    """A setting's value in a label: eps-like floats as fractions of 255 where they are one (``8/255``)."""
    return pixel_text(value) if isinstance(value, float) else str(value)


def short_key(key: str) -> str:
    """``method.gamma`` -> ``gamma``; other keys as they are."""
    return key.split(".", 1)[1] if key.startswith(("method.", "model.")) else key
