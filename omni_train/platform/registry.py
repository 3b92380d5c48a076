"""How a patch of megatron-core is declared, applied and checked (the patch registry).

Three kinds of patch, grouped into named :class:`PatchSet` s; which sets a process applies is
decided by :func:`omni_train.platform.capabilities.choose` (``Platform.patch_sets``):

1. :class:`ProxyTarget`: in a listed megatron module the module-global name ``torch`` is
   replaced by a proxy object (the CPU device's :data:`~omni_train.platform.device.CPU_TORCH`).
   Nothing outside the listed modules sees the proxy.
2. :class:`AttributePatch`: an attribute replaced (or wrapped) by a stand-in; every megatron
   module that imported the original callable by name is rebound too.
3. :class:`SourcePatch`: a function recompiled with one literal changed, for checks that cannot
   be intercepted otherwise.

Every patch names the megatron-core location it targets and a ``needle``: the source fragment
that makes it necessary. :func:`check` verifies that each target still exists and still holds
its needle, so a megatron-core upgrade that removes or fixes a call fails the test suite
instead of leaving a dead patch behind.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import textwrap
import types
from dataclasses import dataclass, field
from typing import Any

from omni_train.platform.capabilities import LIBRARY_MODULES, importable


@dataclass(frozen=True)
class ProxyTarget:
    """A megatron module whose global ``torch`` is replaced by the set's proxy."""

    module: str
    needles: tuple[str, ...]  # CUDA-only source fragments the proxy exists for (staleness check)
    why: str


@dataclass(frozen=True)
class AttributePatch:
    module: str
    name: str
    replacement: Any  # the object, or "module:attr" imported when the patch is applied
    needle: str  # source fragment that makes the patch necessary
    why: str
    must_exist: bool = True  # False: megatron binds the name only with the library; we define it
    needle_module: str = ""  # where the needle lives, if not in ``module``
    wraps: bool = False  # replacement(original) builds the new attribute


@dataclass(frozen=True)
class SourcePatch:
    module: str
    qualname: str  # "function" or "Class.method"
    old: str  # every occurrence in the function is replaced
    new: str
    why: str


@dataclass(frozen=True)
class PatchSet:
    """Patches applied together, under one condition (``when``)."""

    name: str
    when: str  # the condition, for people: "no CUDA", "Transformer Engine not used", ...
    proxy: Any = None  # what ``proxies`` modules see as ``torch``
    proxies: tuple[ProxyTarget, ...] = ()
    attributes: tuple[AttributePatch, ...] = ()
    sources: tuple[SourcePatch, ...] = ()
    # Stand-ins for a library's names: megatron binds them only when that library is absent, so
    # "megatron now defines it" is a finding only then.
    library: str = ""


def _owner(module: types.ModuleType, qualname: str) -> tuple[Any, str]:
    """(object that holds the attribute, attribute name) for "name" or "Class.name"."""
    owner: Any = module
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def _resolve(module: types.ModuleType, qualname: str) -> tuple[Any, str, Any]:
    owner, name = _owner(module, qualname)
    return owner, name, inspect.getattr_static(owner, name)


def _recompile(module: types.ModuleType, patch: SourcePatch) -> tuple[Any, str, Any]:
    """Recompile ``patch.qualname`` with ``patch.old`` replaced; return (owner, name, new attr)."""
    owner, name, attr = _resolve(module, patch.qualname)
    wrapper = type(attr) if isinstance(attr, (classmethod, staticmethod)) else None
    fn = attr.__func__ if wrapper else attr
    lines, first_line = inspect.getsourcelines(fn)
    src = textwrap.dedent("".join(lines))
    if patch.old not in src:
        raise RuntimeError(f"stale patch: {patch.old!r} not in {patch.module}.{patch.qualname}")
    src = src.replace(patch.old, patch.new)
    # Blank the decorators (re-applied below) rather than drop them, to keep line numbers.
    src = "\n".join("" if ln.lstrip().startswith("@") else ln for ln in src.splitlines())
    # Wrap in a factory that binds ``__class__`` so zero-argument super() keeps working, and
    # compile against the module's live globals so every other name resolves as in the original.
    # Leading newlines make tracebacks show the original file's line numbers.
    factory_src = (
        "\n" * (first_line - 2)
        + "def _factory(__class__):\n"
        + textwrap.indent(src, "    ")
        + f"\n    return {name}\n"
    )
    namespace: dict[str, Any] = {}
    filename = inspect.getsourcefile(fn) or patch.module
    exec(compile(factory_src, filename, "exec"), vars(module), namespace)
    new_fn = namespace["_factory"](owner)
    new_fn.__qualname__ = fn.__qualname__
    new_fn.__doc__ = fn.__doc__
    return owner, name, wrapper(new_fn) if wrapper else new_fn


@dataclass
class PatchReport:
    applied: list[str] = field(default_factory=list)


_MISSING = object()
_ORIGINALS: dict[tuple[str, str], Any] = {}
_APPLIED: dict[str, PatchReport] = {}


def _rebind_everywhere(original: Any, replacement: Any) -> list[str]:
    """Point every loaded megatron module's binding of ``original`` at ``replacement``.

    ``from x import f`` copies the binding, so patching ``x.f`` alone would miss the importers.
    """
    rebound = []
    for name, mod in list(sys.modules.items()):
        if not name.startswith("megatron.") or mod is None:
            continue
        for attr, value in list(vars(mod).items()):
            if value is original:
                setattr(mod, attr, replacement)
                rebound.append(f"{name}.{attr}")
    return rebound


def apply(patch_set: PatchSet) -> PatchReport:
    """Apply one set (once per process: a second call returns the first report)."""
    if patch_set.name in _APPLIED:
        return _APPLIED[patch_set.name]
    report = PatchReport()
    for t in patch_set.proxies:
        mod = importlib.import_module(t.module)
        mod.torch = patch_set.proxy
        report.applied.append(f"proxy {t.module}")
    for p in patch_set.attributes:
        mod = importlib.import_module(p.module)
        owner, name = _owner(mod, p.name)
        original = getattr(owner, name, _MISSING)
        _ORIGINALS[(p.module, p.name)] = original
        replacement = p.replacement
        if isinstance(replacement, str):
            src_module, _, attr = replacement.partition(":")
            replacement = getattr(importlib.import_module(src_module), attr)
        if p.wraps:
            replacement = replacement(original)
        setattr(owner, name, replacement)
        if owner is mod and callable(original):
            _rebind_everywhere(original, replacement)
        report.applied.append(f"attr {p.module}.{p.name}")
    for s in patch_set.sources:
        mod = importlib.import_module(s.module)
        owner, name, new_fn = _recompile(mod, s)
        original = inspect.getattr_static(owner, name)
        _ORIGINALS[(s.module, s.qualname)] = original
        setattr(owner, name, new_fn)
        if owner is mod:
            _rebind_everywhere(original, new_fn)
        report.applied.append(f"source {s.module}.{s.qualname}")
    _APPLIED[patch_set.name] = report
    return report


def applied() -> dict[str, PatchReport]:
    """The sets applied in this process, by name."""
    return dict(_APPLIED)


def _library_present(name: str) -> bool:
    return bool(name) and importable(LIBRARY_MODULES[name])


def check(patch_set: PatchSet) -> list[str]:
    """Problems with one set: targets that are gone, or patches that are no longer needed."""
    problems: list[str] = []
    for t in patch_set.proxies:
        try:
            mod = importlib.import_module(t.module)
        except ImportError as e:
            problems.append(f"{t.module}: module is gone ({e})")
            continue
        src = inspect.getsource(mod)
        if "torch" not in vars(mod):
            problems.append(f"{t.module}: has no module-global 'torch' to proxy")
        missing = [n for n in t.needles if n not in src]
        if missing:
            problems.append(f"{t.module}: no longer contains {missing}; the proxy may be stale")
    for p in patch_set.attributes:
        mod = importlib.import_module(p.module)
        try:
            owner, name = _owner(mod, p.name)
        except AttributeError:
            problems.append(f"{p.module}.{p.name}: owner is gone")
            continue
        original = _ORIGINALS.get((p.module, p.name), getattr(owner, name, _MISSING))
        if p.must_exist and original is _MISSING:
            problems.append(f"{p.module}.{p.name}: attribute is gone")
            continue
        defined = original is not _MISSING and original is not None
        if not p.must_exist and defined and not _library_present(patch_set.library):
            problems.append(f"{p.module}.{p.name}: now defined by megatron; patch not needed")
        where = importlib.import_module(p.needle_module) if p.needle_module else mod
        if p.needle not in inspect.getsource(where):
            problems.append(f"{p.module}.{p.name}: {p.needle!r} gone; the patch may be stale")
    for s in patch_set.sources:
        mod = importlib.import_module(s.module)
        fn = _ORIGINALS.get((s.module, s.qualname))
        if fn is None:
            try:
                fn = _resolve(mod, s.qualname)[2]
            except AttributeError:
                problems.append(f"{s.module}.{s.qualname}: function is gone")
                continue
        if s.old not in inspect.getsource(fn):
            problems.append(f"{s.module}.{s.qualname}: {s.old} gone; patch no longer needed")
    return problems
