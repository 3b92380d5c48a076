"""The measured activation costs (``activation_costs/*.json``, written by
:mod:`omni_train.plan.measure`) and their fits.

Each layer kind's saved bytes per rank are fitted as ``c0 + c1 n`` (LM kinds, per token; the
vision and audio *rest*) or ``c0 + c1 n + c2 n^2`` (a ViT block over an image of ``n`` patches,
a conformer layer over a clip of ``n`` frames: attention within the item), least squares over
the measured sizes. Transients (the highest activation + temporary memory above the saved set
during forward and backward) are fitted the same way, per group.

One file per (model, tensor-parallel size): the costs are measured, not scaled, so a layout or
model without a file is refused with the command that measures it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from omni_train.config.model import ModelConfig

COSTS_DIR = Path(__file__).parent / "activation_costs"
QUADRATIC = ("vit_block", "conformer_layer")
# The CPU stand-in for packed attention saves a bool [n, n] mask per image; Transformer
# Engine's fused attention (the GPU path) saves no n x n state, so a GPU plan drops that term.
# NeMo's relative-position attention (conformer) materialises its scores on every platform.
CPU_ONLY_QUADRATIC = ("vit_block",)


def model_key(m: ModelConfig) -> str:
    """Architecture fingerprint: every model field but the name and where it was read from."""
    data = asdict(m)
    data.pop("name"), data.pop("hf_path")
    data.pop("projector_init_method_std")  # an init choice (added later): not in the keys
    if data.get("audio"):  # which streams the data accepts: no activation of any size changes
        data["audio"].pop("min_seconds")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Fit:
    """Bytes as a function of size ``n``: ``c0 + c1 n + c2 n^2``."""

    c0: float
    c1: float
    c2: float = 0.0

    def __call__(self, n: float) -> float:
        return self.c0 + self.c1 * n + self.c2 * n * n

    def without_quadratic(self) -> Fit:
        return Fit(self.c0, self.c1)

    @classmethod
    def of(cls, points: list[tuple[float, float]], quadratic: bool) -> Fit:
        n = np.array([p[0] for p in points], dtype=np.float64)
        y = np.array([p[1] for p in points], dtype=np.float64)
        columns = [np.ones_like(n), n] + ([n * n] if quadratic else [])
        coef, *_ = np.linalg.lstsq(np.stack(columns, axis=1), y, rcond=None)
        return cls(*(float(c) for c in coef))


def setting_key(recompute: bool, trainable: bool, projector_recompute: bool | None = None) -> str:
    """The key :class:`omni_train.plan.measure.Setting` writes."""
    text = f"rc={'on' if recompute else 'off'}|{'train' if trainable else 'frozen'}"
    if projector_recompute is not None:
        text += f"|proj_rc={'on' if projector_recompute else 'off'}"
    return text


class ActivationCosts:
    """Fits of one measured file: ``saved(kind, key)`` and ``transient(group, key)``."""

    def __init__(self, record: dict, path: Path | None = None):
        self.record = record
        self.path = path
        self.tp = record["tp"]

    @classmethod
    def load(cls, m: ModelConfig, tp: int, directory: Path = COSTS_DIR) -> ActivationCosts:
        key = model_key(m)
        for path in sorted(directory.glob("*.json")):
            record = json.loads(path.read_text())
            if record["model"] == key and record["tp"] == tp:
                return cls(record, path)
        raise ValueError(
            f"no measured activation costs for model {m.name!r} (architecture {key}) at "
            f"tensor parallel {tp} in {directory}; measure them (minutes on a CPU host): "
            f"make activation-costs MODEL={m.name} TP={tp}"
        )

    def _fit(self, kind: str, key: str, column: int, quadratic: bool) -> Fit:
        try:
            rows = self.record["points"][kind][key]
        except KeyError:
            raise ValueError(f"{self.path}: no measurement of {kind!r} under {key!r}") from None
        return Fit.of([(r[0], r[column]) for r in rows], quadratic)

    def saved(self, kind: str, key: str, gpu: bool = False) -> Fit:
        fit = self._fit(kind, key, 1, kind in QUADRATIC)
        return fit.without_quadratic() if gpu and kind in CPU_ONLY_QUADRATIC else fit

    def hooked(self, kind: str, key: str) -> Fit | None:
        """The saved-tensor hooks' view of the same kind (a cross-check; None if not recorded)."""
        rows = self.record["points"][kind][key]
        return self._fit(kind, key, 3, kind in QUADRATIC) if len(rows[0]) > 3 else None

    def transient(self, group: str, key: str) -> Fit:
        kind = "transient" if group == "lm" else f"{group}_transient"
        return self._fit(kind, key, 2, False)
