"""``omni-train eval`` (omni_train.inference.evaluate, .metrics): normalisation, exact match,
WER / CER against hand-computed values; the CLI end to end on a tiny checkpoint over a JSONL
file (text, image, an audio transcription row, an unreadable row) and over a converted
dataset's val split, where its teacher-forced numbers equal the answer probe's (the probe's
own front door); the same metrics computed by a stage while it trains (``trainer.eval_answers``,
TP 2 + SP) against ``omni-train eval`` on its checkpoint, and the rows it picks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from launch import launch

from omni_train.datatools import prepare
from omni_train.inference import metrics as m
from omni_train.stage.launch import torchrun

PROBE = Path(__file__).with_name("eval_probe.py")
TINY = ("model=tiny", "trainer.precision=fp32")
NEW = 4  # generated tokens per row


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


def _rows() -> list[dict]:
    def user(*parts):
        return {"role": "user", "content": list(parts)}

    image = {"type": "image", "member": "a.png"}
    return [
        {"conversation": [user({"type": "text", "text": "Say hi."}),
                          {"role": "assistant", "content": "Hi there!"}]},
        {"conversation": [user(image, {"type": "text", "text": "Colour?"}),
                          {"role": "assistant", "content": "Red."}]},
        {"audio_filepath": "t.wav", "duration": 1.0, "text": "Hello world."},  # an ASR row
        {"category": "qa", "conversation": [user({"type": "text", "text": "2+2?"}),
                                            {"role": "assistant", "content": "4"}]},
        {"conversation": [user({"type": "image", "member": "missing.png"}),
                          {"role": "assistant", "content": "x"}]},
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model's checkpoint; a JSONL of text, image, ASR, "qa" and unreadable rows; the
    same rows answered by the model itself (category "self")."""
    from omni_train.datatools.encode import encode_png, encode_wav

    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    (root / "a.png").write_bytes(encode_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    (root / "t.wav").write_bytes(encode_wav(tone.astype(np.float32), 16000))
    jsonl = root / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    ckpt, own = root / "ckpt", root / "self.jsonl"
    ckpt.mkdir()
    torchrun(1, str(PROBE), str(ckpt), str(jsonl), str(own), str(NEW), *TINY, timeout=600)
    both = root / "both.jsonl"
    both.write_text(jsonl.read_text() + own.read_text())
    return {"root": root, "ckpt": ckpt, "jsonl": both}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "omni_train.cli", *args, *TINY]


def test_eval_cli_on_jsonl_groups_scores_and_counts_failures(tiny):
    out = tiny["root"] / "eval.json"
    proc = subprocess.run(
        _cli("eval", str(tiny["ckpt"]), "--data", str(tiny["jsonl"]), "--max-new-tokens",
             str(NEW), "--batch-size", "3", "--json", str(out)),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    groups = {(g["source"], g["category"]): g for g in r["groups"]}
    src = "both.jsonl"
    assert {k: g["rows"] for k, g in groups.items()} == {
        (src, "text"): 1, (src, "image"): 1, (src, "audio"): 1, (src, "qa"): 1,
        (src, "unreadable"): 1, (src, "self"): 3,
    }  # fmt: skip
    assert groups[(src, "unreadable")]["failed"] == {"missing_media": 1}
    assert r["total"]["rows"] == 8 and r["total"]["teacher_forced_rows"] == 7
    assert r["total"]["generated_rows"] == 7
    # WER / CER only on the ASR row (data convert's "Transcribe the audio." turn)
    assert [k for k, g in groups.items() if g["transcription_rows"]] == [(src, "audio")]
    rows = {(x["source"], x["key"], x["category"]): x for x in r["rows"]}
    (asr,) = [x for x in rows.values() if x["category"] == "audio"]
    w, c = (
        m.word_edits(asr["generated"], "Hello world."),
        m.char_edits(asr["generated"], "Hello world."),
    )
    assert groups[(src, "audio")]["wer"] == pytest.approx(w.errors / 2)  # "hello world"
    assert groups[(src, "audio")]["cer"] == pytest.approx(c.errors / 11)
    # the model's own greedy answers: teacher-forced and generated exact match must both hold
    assert groups[(src, "self")]["exact"] == 1.0 and groups[(src, "self")]["generate_exact"] == 1.0
    scored = [x for x in rows.values() if "loss" in x]
    assert r["total"]["loss"] == pytest.approx(
        sum(x["loss"] for x in scored) / sum(x["answer_tokens"] for x in scored)
    )
    assert "total" in proc.stdout and "both.jsonl / self" in proc.stdout


def test_eval_on_a_converted_datasets_val_split_equals_the_probe(tiny, tmp_path):
    """Per learnability task, eval's teacher-forced loss and exact match on the val split are
    the answer probe's loss and accuracy (one assistant turn: the same answer tokens)."""
    from omni_train.datatools.prepare import synthesize

    synthesize(tmp_path / "learn", 12, 0, val_every=3, flavour="learn",
               tasks=["image_colour", "audio_pitch"])  # fmt: skip
    ckpt, data = str(tiny["ckpt"]), str(tmp_path / "learn")
    procs = [
        subprocess.Popen(_cli("probe", ckpt, "--data", data, "--json", str(tmp_path / "p.json")),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        subprocess.Popen(_cli("eval", ckpt, "--data", data, "--metrics", "loss,exact",
                              "--json", str(tmp_path / "e.json")),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
    ]  # fmt: skip
    for p in procs:
        output = p.communicate(timeout=600)[0]
        assert p.returncode == 0, output[-3000:]
    probe = json.loads((tmp_path / "p.json").read_text())
    ev = json.loads((tmp_path / "e.json").read_text())
    got = {g["category"]: g for g in ev["groups"]}
    assert {g["source"]: g["category"] for g in ev["groups"]} == {
        "audio": "audio_pitch", "image": "image_colour"
    }  # fmt: skip
    assert "generate_exact" not in ev["total"] and "wer" not in ev["total"]
    for task, want in probe.items():
        assert got[task]["rows"] == got[task]["teacher_forced_rows"] == want["num_samples"]
        assert got[task]["exact"] == want["accuracy"]
        assert got[task]["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_a_stage_scores_its_answers_while_it_trains_as_eval_scores_its_checkpoint(tmp_path):
    """``trainer.eval_answers`` under TP 2 + SP (sequence parallelism off for its duration):
    the answer metrics in the manifest at the stage's end equal ``omni-train eval``'s on the
    stage's checkpoint in one process, on the same rows; the stage trains exactly as it does
    without them (the same losses, bit for bit: the RNG is forked, and training goes on under
    SP after the evaluation at step 2)."""
    root = tmp_path / "learn"
    prepare.synthesize(root, 8, 0, flavour="learn", tasks=["image_shape", "audio_pitch"])
    common = ["stage=learn", "model=tiny", "parallel=tp2", f"data.path={root}/learn.yaml",
              "trainer.train_steps=4", "trainer.eval_interval=2",
              "trainer.eval_iters=1"]  # fmt: skip
    answers = ["trainer.eval_answers.num_samples=100", f"trainer.eval_answers.data={root}",
               f"trainer.eval_answers.max_new_tokens={NEW}",
               "trainer.eval_answers.batch_size=5"]  # fmt: skip
    scored = launch(2, tmp_path / "scored", *common, *answers)
    plain = launch(2, tmp_path / "plain", *common)
    assert scored["losses"] == plain["losses"] and len(scored["losses"]) == 4
    assert [e["step"] for e in scored["evals"] if "answers" in e] == [2, 4]
    assert plain["answers"] is None and all("answers" not in e for e in plain["evals"])
    ours = {g["category"]: g for g in scored["answers"]["groups"]}
    assert {c: g["rows"] for c, g in ours.items()} == {"image_shape": 12, "audio_pitch": 12}

    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, "-m", "omni_train.cli", "eval", str(tmp_path / "scored"), "--data",
         str(root), "--metrics", "loss,exact,generate", "--max-new-tokens", str(NEW),
         "--json", str(out), "stage=learn", "model=tiny"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    theirs = {g["category"]: g for g in json.loads(out.read_text())["groups"]}
    assert ours.keys() == theirs.keys()
    for category, g in theirs.items():
        mine = ours[category]
        for key in ("rows", "failed", "answer_tokens", "exact", "generated_rows"):
            assert mine[key] == g[key], (category, key)
        assert mine["generate_exact"] == g["generate_exact"], category
        assert mine["loss"] == pytest.approx(g["loss"], rel=1e-5), category


def test_heldout_rows_take_a_row_from_each_group_in_turn(tmp_path):
    from omni_train.config import compose_job
    from omni_train.inference.evaluate import heldout_rows

    root = tmp_path / "learn"
    prepare.synthesize(root, 8, 0, flavour="learn", tasks=["image_colour", "image_shape"])

    def rows(*overrides):
        cfg = compose_job(["stage=learn", "model=tiny", f"data.path={root}/learn.yaml",
                           *overrides])  # fmt: skip
        return [(r.source, r.category) for r in heldout_rows(cfg)]

    # the stage's own datasets (learn.yaml's image folder), in turn: colour, shape, colour, ...
    got = rows("trainer.eval_answers.num_samples=5")
    assert got == [("image", "image_colour"), ("image", "image_shape")] * 2 + [
        ("image", "image_colour")
    ]
    # more than there are: every row once (12 per task)
    assert len(rows("trainer.eval_answers.num_samples=100")) == 24
    only = rows(
        "trainer.eval_answers.num_samples=3", "trainer.eval_answers.categories=[image_shape]"
    )
    assert only == [("image", "image_shape")] * 3
    with pytest.raises(ValueError, match=r"no rows in .* of categories \['audio_pitch'\]"):
        rows("trainer.eval_answers.num_samples=3", "trainer.eval_answers.categories=[audio_pitch]")
