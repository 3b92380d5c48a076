"""Per-stage energon blends (``data_blends/stage*.yaml``).

Each blend is a MetadatasetV2 whose dataset paths are OmegaConf variables (``path: ${asr}``).
``resolve_blend`` substitutes absolute paths for them, ``write_metadataset`` writes the result
where energon can load it, and ``category_weights`` / ``expected_token_shares`` read the mixture
back. See ``data_blends/README.md`` for the weight arithmetic.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

BLENDS_DIR = Path(
    os.environ.get("OMNI_TRAIN_BLENDS") or Path(__file__).parents[2] / "data_blends"
).absolute()
SYNTHETIC_CATEGORIES = ("text", "image", "multi_image", "document", "video", "audio", "audio_video")

_SYNTHETIC_MAP = "synthetic"
_VARIABLE = re.compile(r"\$\{([^}]*)\}")
_VARIABLE_NAME = re.compile(r"[a-z][a-z0-9_]*")
# Remote (msc://, s3://, ...) paths are already absolute; only local paths get anchored.
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def available_blends() -> list[str]:
    """Names of the stage blends (every ``*.yaml`` in ``BLENDS_DIR`` but ``synthetic.yaml``)."""
    return sorted(p.stem for p in BLENDS_DIR.glob("*.yaml") if p.stem != _SYNTHETIC_MAP)


def _raw(name: str) -> dict[str, Any]:
    valid = available_blends()
    if name not in valid:
        raise ValueError(f"unknown blend {name!r}; valid blends: {', '.join(valid)}")
    cfg = OmegaConf.load(BLENDS_DIR / f"{name}.yaml")
    return OmegaConf.to_container(cfg, resolve=False)


def _strings(node: Any):
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _variables(raw: dict[str, Any], name: str) -> list[str]:
    found = {m.group(1) for s in _strings(raw) for m in _VARIABLE.finditer(s)}
    bad = sorted(v for v in found if not _VARIABLE_NAME.fullmatch(v) or v in raw)
    if bad:
        raise ValueError(f"blend {name!r}: malformed path variable(s) {bad} (want snake_case)")
    return sorted(found)


def blend_variables(name: str) -> list[str]:
    """The ``${...}`` path variables blend ``name`` needs, sorted."""
    return _variables(_raw(name), name)


def _absolute(var: str, path: str | os.PathLike) -> str:
    text = os.fspath(path)
    if not text:
        raise ValueError(f"data.paths.{var} is empty")
    if "${" in text:
        # OmegaConf would try to resolve it; a literal "${" in a dataset path is not worth escaping.
        raise ValueError(f"data.paths.{var}={text!r}: unresolved interpolation")
    if _URL.match(text):
        return text
    # abspath, not resolve(): keep the user's symlinks (e.g. a dataset link to a mounted store).
    return os.path.abspath(os.path.expanduser(text))


def _split_entries(raw: dict[str, Any], multi: Mapping[str, list]) -> tuple[dict, dict]:
    """``raw`` with every entry of a variable in ``multi`` (variable -> several datasets) split
    into one entry per dataset, ``var__0``, ``var__1``, ..., sharing its weight evenly (the
    same subflavors); and those variables' paths."""
    out = dict(raw, splits={})
    for split, body in raw.get("splits", {}).items():
        entries = []
        for e in body["blend"]:
            m = _VARIABLE.fullmatch(str(e["path"]))
            if m is None or m.group(1) not in multi:
                entries.append(e)
                continue
            targets = multi[m.group(1)]
            weight = float(e["weight"]) / len(targets)
            entries += [dict(e, path=f"${{{m.group(1)}__{i}}}", weight=weight)
                        for i in range(len(targets))]  # fmt: skip
        out["splits"][split] = dict(body, blend=entries)
    paths = {f"{var}__{i}": p for var, targets in multi.items() for i, p in enumerate(targets)}
    return out, paths


def resolve_blend(
    name: str, paths: Mapping[str, str | os.PathLike | list[str]], temperature: float = 1.0
) -> dict[str, Any]:
    """Blend ``name`` as a plain dict, every path variable replaced by an absolute path. A
    variable given a list of paths (the synthetic map's stand-ins) becomes one entry per path,
    sharing the entry's weight evenly. The weights are :func:`tempered` first."""
    raw = tempered(_raw(name), temperature)
    multi = {v: list(p) for v, p in paths.items() if isinstance(p, list | tuple)}
    if multi:
        needed = set(_variables(raw, name))
        raw, split = _split_entries(raw, {v: p for v, p in multi.items() if v in needed})
        paths = {**{v: p for v, p in paths.items() if v not in multi or v not in needed}, **split}
    needed = _variables(raw, name)
    missing = sorted(set(needed) - set(paths))
    unknown = sorted(set(paths) - set(needed))
    problems = []
    if missing:
        problems.append(
            f"missing dataset path variable(s) {', '.join(missing)}: set data.paths.<var>=DIR "
            f"for each in the recipe, or on the command line with a leading '+' "
            f"(e.g. +data.paths.{missing[0]}=/data/{missing[0]})"
        )
    if unknown:
        problems.append(
            f"unknown dataset path variable(s) {', '.join(unknown)} "
            f"(blend {name} uses: {', '.join(needed)})"
        )
    if problems:
        raise ValueError(f"blend {name!r}: " + "; ".join(problems))
    values = {var: _absolute(var, paths[var]) for var in needed}
    # Interpolations are absolute from the config root: put the variables there, resolve, drop.
    merged = OmegaConf.merge(OmegaConf.create(raw), values)
    resolved = OmegaConf.to_container(merged, resolve=True)
    for var in needed:
        del resolved[var]
    return resolved


def synthetic_paths(name: str, root: str | Path) -> dict[str, str | list[str]]:
    """Each variable of blend ``name`` -> ``root/<synthetic category>`` (``synthetic.yaml``),
    or a list of them where the map names several categories for one variable."""
    mapping = OmegaConf.to_container(OmegaConf.load(BLENDS_DIR / f"{_SYNTHETIC_MAP}.yaml"))
    out: dict[str, str | list[str]] = {}
    for var in blend_variables(name):
        categories = mapping.get(var)
        listed = categories if isinstance(categories, list) else [categories]
        bad = [c for c in listed if c not in SYNTHETIC_CATEGORIES]
        if bad or not listed:
            raise ValueError(
                f"{_SYNTHETIC_MAP}.yaml maps {var!r} to {categories!r}; "
                f"want one or a list of {', '.join(SYNTHETIC_CATEGORIES)}"
            )
        found = [str(Path(root) / c) for c in listed]
        out[var] = found if isinstance(categories, list) else found[0]
    return out


def job_paths(
    name: str, paths: Mapping[str, str], synthetic_root: str | None
) -> dict[str, str | list[str]]:
    """The variables a job gives blend ``name``: ``data.paths``, and for every variable not
    set there, the synthetic category under ``data.synthetic_root`` (when set)."""
    out = dict(paths)
    if synthetic_root is not None:
        for var, path in synthetic_paths(name, synthetic_root).items():
            out.setdefault(var, path)
    return out


def dataset_dirs(resolved: dict[str, Any]) -> list[str]:
    """Every dataset path of a resolved blend (both splits, without duplicates)."""
    found: list[str] = []
    for split in resolved.get("splits", {}).values():
        for entry in split.get("blend", []):
            if entry["path"] not in found:
                found.append(entry["path"])
    return found


def stage_dataset_dirs(
    blend: str | None, paths: Mapping[str, str], synthetic_root: str | None, path: str | None
) -> list[str]:
    """The dataset folders a job's data config names: ``data.path`` (one dataset, or a
    metadataset file: its entries, relative to the file's folder), else the blend's resolved
    paths (``data.blend``, ``data.paths``, ``data.synthetic_root``)."""
    if path is None:
        return dataset_dirs(resolve_blend(blend, job_paths(blend, paths, synthetic_root)))
    if not Path(path).is_file():
        return [path]
    doc = yaml.safe_load(Path(path).read_text()) or {}
    found = dataset_dirs(doc)
    return [p if _URL.match(p) else str(Path(path).parent / p) for p in found]


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def tempered(resolved: dict[str, Any], temperature: float) -> dict[str, Any]:
    """``resolved`` with every split's weights ``w`` replaced by ``w ** (1 / temperature)``
    (temperature sampling, as multilingual LMs balance their languages: 1 keeps the blend,
    larger values flatten it towards one weight per entry; the entries stay the same)."""
    if temperature == 1.0:
        return resolved
    out = dict(resolved, splits={})
    for split, body in resolved.get("splits", {}).items():
        entries = [dict(e, weight=float(e["weight"]) ** (1.0 / temperature)) for e in body["blend"]]
        out["splits"][split] = dict(body, blend=entries)
    return out


def write_metadataset(
    name: str,
    paths: Mapping[str, str | os.PathLike],
    out_dir: str | Path,
    temperature: float = 1.0,
) -> Path:
    """Write the resolved blend (its weights :func:`tempered`) to ``out_dir/<name>.yaml``
    (atomically) and return its path."""
    resolved = resolve_blend(name, paths, temperature)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name}.yaml"
    if target.resolve() == (BLENDS_DIR / f"{name}.yaml").resolve():
        raise ValueError(f"refusing to overwrite the blend source {target}")
    text = f"# Generated from {BLENDS_DIR / name}.yaml by omni_train.config.blends; do not edit.\n"
    if temperature != 1.0:
        text += f"# Weights tempered: w ** (1 / {temperature}) (data.blend_temperature).\n"
    text += yaml.dump(resolved, Dumper=_NoAliasDumper, sort_keys=False, width=100)
    # Several ranks may write the same file at once: write aside, then rename over the target.
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _train_entries(name: str) -> list[dict[str, Any]]:
    return _raw(name)["splits"]["train"]["blend"]


def category_weights(name: str) -> dict[str, float]:
    """Per-sample sampling probability of each category (train split, normalised)."""
    entries = _train_entries(name)
    total = sum(float(e["weight"]) for e in entries)
    return {e["subflavors"]["category"]: float(e["weight"]) / total for e in entries}


def expected_token_shares(name: str) -> dict[str, float]:
    """Token share of each category implied by the weights: weight * mean_tokens, normalised."""
    entries = _train_entries(name)
    tokens = {
        e["subflavors"]["category"]: float(e["weight"]) * e["subflavors"]["mean_tokens"]
        for e in entries
    }
    total = sum(tokens.values())
    return {cat: t / total for cat, t in tokens.items()}
