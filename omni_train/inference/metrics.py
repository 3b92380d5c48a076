"""Text metrics of ``omni-train eval``: normalisation, exact match, WER / CER.

Normalisation (:func:`normalize`), the rules of the usual QA / ASR normalisers (SQuAD's
``normalize_answer``, Whisper's ``BasicTextNormalizer``) without their language-specific ones
(no article removal, no spelling or number rewriting):

1. Unicode NFKC (full-width and compatibility forms fold to their plain characters);
2. lower-case (``str.casefold``);
3. every punctuation or symbol character (Unicode categories ``P*`` and ``S*``) becomes a space;
4. runs of whitespace become one space, and the ends are stripped.

Exact match compares normalised texts. WER and CER come from ``jiwer`` (pinned) on normalised
texts and are pooled over a group's rows: the summed edit operations (substitutions, deletions,
insertions) over the summed reference words (characters, spaces included, for CER), so a group's
rate is not an average of per-row rates. A reference that normalises to nothing counts its
hypothesis' words (characters) as insertions against zero reference length (jiwer refuses
empty references).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import jiwer

from omni_train.config.training import ANSWER_METRICS as METRICS  # what --metrics selects


def parse_metrics(text: str) -> tuple[str, ...]:
    """``--metrics`` (a comma list of :data:`METRICS`) -> the chosen names."""
    chosen = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = sorted(set(chosen) - set(METRICS))
    if unknown or not chosen:
        raise ValueError(f"--metrics: unknown {unknown}; choose from {','.join(METRICS)}")
    return chosen


def normalize(text: str) -> str:
    """``text`` under the rules of the module docstring."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text)
    return " ".join(text.split())


def exact_match(hypothesis: str, reference: str) -> bool:
    return normalize(hypothesis) == normalize(reference)


@dataclass
class EditCounts:
    """Edit operations against a reference length, summed over rows."""

    errors: int = 0
    length: int = 0

    def add(self, other: EditCounts) -> None:
        self.errors += other.errors
        self.length += other.length

    @property
    def rate(self) -> float | None:
        return self.errors / self.length if self.length else None


def _edits(out) -> EditCounts:
    return EditCounts(
        out.substitutions + out.deletions + out.insertions,
        out.hits + out.substitutions + out.deletions,
    )


def word_edits(hypothesis: str, reference: str) -> EditCounts:
    """Word-level edits of normalised ``hypothesis`` against normalised ``reference``."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref:
        return EditCounts(len(hyp.split()), 0)
    return _edits(jiwer.process_words(ref, hyp))


def char_edits(hypothesis: str, reference: str) -> EditCounts:
    """Character-level edits (spaces count) of the normalised texts."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref:
        return EditCounts(len(hyp), 0)
    return _edits(jiwer.process_characters(ref, hyp))
