"""Per-field checks shared by the component configs' ``__post_init__``."""

from __future__ import annotations


def positive(owner: str, **values: int | float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{owner}.{name} must be > 0, got {value}")
