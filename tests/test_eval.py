"""``omni-train eval`` (omni_train.inference.evaluate, .metrics): normalisation, exact match,
WER / CER against hand-computed values; the CLI end to end on a tiny checkpoint over a JSONL
file (text, image, an audio transcription row, an unreadable row) and over a converted
dataset's val split, where its teacher-forced numbers equal the answer probe's."""

from __future__ import annotations

import pytest

from omni_train.inference import metrics as m


def test_normalize_lowercases_and_drops_punctuation_and_extra_spaces():
    assert m.normalize("  Hello,   World!! ") == "hello world"
    assert m.normalize("It's 3.5 $") == "it s 3 5"  # punctuation and symbols become spaces
    assert m.normalize("ＡＢＣ\tdef\n") == "abc def"  # NFKC folds full-width letters
    assert m.normalize("Straße") == "strasse"  # casefold
    assert m.normalize("...") == ""
    assert m.exact_match("The answer: RED.", "the answer red")
    assert not m.exact_match("red", "reds")


def test_word_and_char_error_rates_by_hand():
    # reference "the cat sat on the mat" (6 words); hypothesis drops "the", swaps "sat"
    w = m.word_edits("The cat sit on mat.", "the cat sat on the mat")
    assert (w.errors, w.length) == (2, 6)  # 1 substitution + 1 deletion
    assert w.rate == pytest.approx(2 / 6)
    w = m.word_edits("a b c d", "a b")  # 2 insertions over 2 reference words
    assert (w.errors, w.length) == (2, 2)
    c = m.char_edits("kitten", "sitting")  # Levenshtein 3 over 7 characters
    assert (c.errors, c.length) == (3, 7)
    c = m.char_edits("a b", "ab")  # the space counts: one insertion
    assert (c.errors, c.length) == (1, 2)
    empty = m.word_edits("two words", "!!")  # an empty reference: insertions, no length
    assert (empty.errors, empty.length, empty.rate) == (2, 0, None)
    pooled = m.EditCounts()
    pooled.add(m.word_edits("x", "a"))  # 1 / 1
    pooled.add(m.word_edits("a b c", "a b c"))  # 0 / 3
    assert pooled.rate == pytest.approx(1 / 4)  # pooled, not the mean of 1.0 and 0.0


def test_parse_metrics():
    assert m.parse_metrics("loss, wer") == ("loss", "wer")
    with pytest.raises(ValueError, match="unknown"):
        m.parse_metrics("loss,bleu")
