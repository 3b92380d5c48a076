"""Every command-line override must name something: a recipe group or a field of the typed config.

Hydra refuses a misspelt key (``trainer.train_stepz=5``), but with its ``+`` prefix
(``+trainer.train_stepz=5``, ``+peft=lora``) it appends the key to the composed config, and the
typed conversion then drops it without a word: a user who writes ``+checkpoint.init_fromm=...``
would train from scratch. This check runs before Hydra composes anything and refuses, in one
line, any override whose key is neither a recipe group (a folder of ``recipes/``) nor a path of
:class:`~omni_train.config.schema.JobConfig` fields. Entries of a declared open mapping (a field
typed ``dict[...]``: ``data.paths``, ``checkpoint.init_components``) are free, with or without
``+``, as their owners check them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from omni_train.config.schema import JobConfig

_HINT = "('omni-train config' prints every field)"


@functools.cache
def _hints(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _unwrap(t):
    """``X | None`` -> ``X`` (an optional section, e.g. ``model.audio``)."""
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return t


def _is_dataclass_type(t) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def _is_mapping(t) -> bool:
    return typing.get_origin(t) is dict or t is dict


def check_path(key: str) -> None:
    """Raise ``ValueError`` unless ``key`` (dotted) is a field of :class:`JobConfig` or lies
    inside an open mapping field."""
    cls, walked = JobConfig, []
    for part in key.split("."):
        hints = _hints(cls)
        if part not in hints:
            where = ".".join(walked) or "the config"
            close = difflib.get_close_matches(part, list(hints), n=1)
            maybe = f"; did you mean {'.'.join([*walked, close[0]])}?" if close else ""
            raise ValueError(f"unknown config key {key!r}: {where} has no field {part!r}{maybe} "
                             f"{_HINT}")  # fmt: skip
        walked.append(part)
        t = _unwrap(hints[part])
        if _is_mapping(t):
            return  # an open mapping: its entries are the owner's to check
        if not _is_dataclass_type(t):
            if len(walked) < len(key.split(".")):
                raise ValueError(
                    f"unknown config key {key!r}: {'.'.join(walked)} is a value, not a section "
                    f"{_HINT}"
                )
            return
        cls = t


def check_overrides(overrides: list[str], groups: dict[str, list[str]]) -> None:
    """Refuse overrides that name no recipe group (``groups``: name -> its recipes) and no
    config field, and group choices that do not exist, each in one line."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ValueError(f"cannot read the overrides: {str(e).strip().splitlines()[0]}") from None
    for o in parsed:
        key = o.key_or_group
        if key in groups:
            value = o.value() if not o.is_delete() else None
            known = groups[key]
            if known and isinstance(value, str) and value != "null" and value not in known:
                raise ValueError(f"unknown {key} {value!r}; valid: {', '.join(known)}")
            continue
        if "." not in key and key not in _hints(JobConfig):
            close = difflib.get_close_matches(key, [*groups, *_hints(JobConfig)], n=1)
            maybe = f"; did you mean {close[0]}?" if close else ""
            raise ValueError(
                f"unknown config group or field {key!r} in {o.input_line!r}{maybe} (groups: "
                f"{', '.join(sorted(groups))}; sections: {', '.join(_hints(JobConfig))})"
            )
        check_path(key)
