"""What a stage does with the run in its output folder, without processes: integrity records,
damaged and unnamed checkpoints, ``resume=strict``, starting over, schedule changes, and
overrides that name nothing. The same rules run for real in ``test_faults.py``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from omni_train.checkpoint import integrity
from omni_train.checkpoint.layout import find_latest, resume_point
from omni_train.config import compose_job
from omni_train.stage.resume import act, decide, schedule_notes, schedule_of

BASE = ["stage=smoke", "model=tiny"]


def fake_checkpoint(out: Path, step: int, *, record: bool = True, big: bool = False) -> Path:
    """A checkpoint folder as torch_dist and omni-train leave it (contents are random bytes)."""
    path = out / "checkpoints" / f"step_{step:07d}"
    path.mkdir(parents=True)
    size = 3 * integrity.HEAD_TAIL if big else 1000
    for name in ("__0_0.distcp", "__1_0.distcp"):
        (path / name).write_bytes(os.urandom(size))
    (path / ".metadata").write_bytes(os.urandom(200))
    (path / "metadata.json").write_text("{}")
    if record:
        names = integrity.files_of(path)
        integrity.write_record(path, integrity.digest_files(path, names, "head_tail"), "head_tail")
    return path


def cfg_for(out: Path, *overrides: str):
    return compose_job([*BASE, f"checkpoint.output_dir={out}", *overrides])


def test_the_record_catches_missing_cut_grown_and_changed_files(tmp_path):
    ckpt = fake_checkpoint(tmp_path, 2, big=True)
    assert integrity.verify(ckpt) is None
    f = ckpt / "__1_0.distcp"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert "is 393,216 bytes, 786,432 when saved" in integrity.verify(ckpt)
    f.write_bytes(data + b"x")
    assert "when saved" in integrity.verify(ckpt)
    f.write_bytes(b"\0" + data[1:])  # same size, the head changed
    assert "differs from what was saved" in integrity.verify(ckpt)
    f.write_bytes(data)
    assert integrity.verify(ckpt) is None
    (ckpt / ".metadata").unlink()
    assert integrity.verify(ckpt) == ".metadata is missing"
    (ckpt / integrity.RECORD).unlink()
    assert integrity.verify(ckpt) == integrity.NO_RECORD
    (ckpt / integrity.RECORD).write_text("{not json")
    assert "unreadable" in integrity.verify(ckpt)


def test_a_middle_byte_is_caught_only_by_full_digests(tmp_path):
    ckpt = fake_checkpoint(tmp_path, 2, big=True)
    f = ckpt / "__0_0.distcp"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    assert integrity.verify(ckpt) is None  # head_tail: by design (docs/checkpoints.md)
    names = integrity.files_of(ckpt)
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    integrity.write_record(ckpt, integrity.digest_files(ckpt, names, "full"), "full")
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    assert "differs from what was saved (SHA-256, full)" in integrity.verify(ckpt)


@pytest.mark.parametrize("latest", [None, b"\xff\xfe\x00", b"hello there", b"", b"step_0000099"])
def test_without_a_readable_latest_the_newest_intact_step_is_resumed(tmp_path, latest):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4)
    if latest is not None:
        (tmp_path / "checkpoints" / "latest").write_bytes(latest)
    d = decide(cfg_for(tmp_path))
    assert d.path.name == "step_0000004" and not d.set_aside
    if latest:
        assert any("latest" in note for note in d.notes)


def test_a_damaged_newest_checkpoint_is_passed_over_or_stops_a_strict_resume(tmp_path):
    fake_checkpoint(tmp_path, 2)
    newest = fake_checkpoint(tmp_path, 4)
    (newest / "__1_0.distcp").write_bytes(b"cut")
    (tmp_path / "checkpoints" / "latest").write_text("step_0000004")
    with pytest.raises(ValueError, match=r"step_0000004 is damaged: __1_0.distcp is 3 bytes, "
                       r"1,000 when saved; checkpoint.resume=strict stops here"):  # fmt: skip
        decide(cfg_for(tmp_path, "checkpoint.resume=strict"))
    d = decide(cfg_for(tmp_path))
    assert d.path.name == "step_0000002" and d.set_aside == [newest]
    assert any("step_0000004 is damaged" in n for n in d.notes)
    act(cfg_for(tmp_path), d)  # set aside, never deleted
    assert (tmp_path / "checkpoints" / "damaged-step_0000004" / "__1_0.distcp").exists()
    assert find_latest(tmp_path).name == "step_0000002"


def test_a_save_that_did_not_finish_is_passed_over_even_by_a_strict_resume(tmp_path):
    fake_checkpoint(tmp_path, 2)
    (tmp_path / "checkpoints" / "latest").write_text("step_0000002")
    fake_checkpoint(tmp_path, 4, record=False)  # crashed before its record
    d = decide(cfg_for(tmp_path, "checkpoint.resume=strict"))
    assert d.path.name == "step_0000002"
    assert any("step_0000004: no integrity record" in n for n in d.notes)


def test_checkpoints_from_before_integrity_records_still_resume(tmp_path):
    fake_checkpoint(tmp_path, 2, record=False)
    d = decide(cfg_for(tmp_path))
    assert d.path.name == "step_0000002" and "resumed unverified" in d.notes[0]
    assert resume_point(tmp_path).path.name == "step_0000002"


def test_a_folder_with_a_run_is_never_started_over_without_the_flag(tmp_path):
    # every checkpoint damaged
    bad = fake_checkpoint(tmp_path / "a", 2)
    (bad / ".metadata").unlink()
    with pytest.raises(ValueError, match="only damaged checkpoints .* checkpoint.start_over=true"):
        decide(cfg_for(tmp_path / "a"))
    # a completed (or interrupted) run that left no checkpoint
    for status in ("completed", "interrupted"):
        out = tmp_path / status
        out.mkdir()
        (out / "manifest.json").write_text(json.dumps({"status": status}))
        with pytest.raises(ValueError, match=f"holds a {status} run and no intact checkpoint"):
            decide(cfg_for(out))
    # a failed attempt that saved nothing starts again without asking
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "manifest.json").write_text(json.dumps({"status": "failed"}))
    assert decide(cfg_for(tmp_path / "failed")).path is None
    # with the flag: the old run moves to superseded-<time>/, nothing is deleted
    fake_checkpoint(tmp_path / "completed", 4)
    c = cfg_for(tmp_path / "completed", "checkpoint.start_over=true")
    d = decide(c)
    assert d.archive and d.path is None
    act(c, d)
    (old,) = (tmp_path / "completed").glob("superseded-*")
    assert (old / "manifest.json").exists() and (old / "checkpoints" / "step_0000004").is_dir()
    assert not (tmp_path / "completed" / "checkpoints").exists()
    with pytest.raises(ValueError, match="contradict"):
        cfg_for(tmp_path, "checkpoint.start_over=true", "checkpoint.resume=strict")
    with pytest.raises(ValueError, match="already holds checkpoints and checkpoint.resume=false"):
        fake_checkpoint(tmp_path / "b", 2)
        decide(cfg_for(tmp_path / "b", "checkpoint.resume=false"))


def test_a_resume_with_another_schedule_says_what_changed(tmp_path):
    fake_checkpoint(tmp_path, 4)
    saved = schedule_of(cfg_for(tmp_path, "trainer.train_steps=12"))
    (tmp_path / "manifest.json").write_text(json.dumps({"status": "interrupted",
                                                        "schedule": saved}))  # fmt: skip
    check = lambda *o: schedule_notes(cfg_for(tmp_path, *o), tmp_path)  # noqa: E731
    assert decide(cfg_for(tmp_path, "trainer.train_steps=16")).path.name == "step_0000004"
    assert check("trainer.train_steps=12") == []
    with pytest.raises(ValueError, match=r"train_steps 12 -> 16, .*lr_decay_steps 12 -> 16.*"
                       r"on_schedule_change=keep"):  # fmt: skip
        check("trainer.train_steps=16")
    with pytest.raises(ValueError, match=r"max_lr 0.003 -> 0.006"):
        check("trainer.train_steps=12", "optimizer.lr_scale=2")
    keep = check("trainer.train_steps=16", "checkpoint.on_schedule_change=keep")
    assert "the checkpoint's LR schedule continues" in keep[-1]
    rescale = check("trainer.global_batch_size=8", "trainer.train_steps=12",
                    "checkpoint.on_schedule_change=rescale")  # fmt: skip
    assert "global_batch_size 4 -> 8" in rescale[-1]


@pytest.mark.parametrize(
    "override,message",
    [
        ("+trainer.train_stepz=5", "no field 'train_stepz'; did you mean trainer.train_steps"),
        ("trainer.train_stepz=5", "trainer has no field 'train_stepz'"),
        ("+checkpoint.init_fromm=/x", "did you mean checkpoint.init_from"),
        ("+adapters=lora", "unknown config group or field 'adapters'"),
        ("++trainer.x.y=1", "trainer has no field 'x'"),
        ("trainer.train_steps.x=1", "trainer.train_steps is a value, not a section"),
        ("stage=nope", "unknown stage 'nope'"),
        ("cluster=nope", "unknown cluster 'nope'"),
    ],
)  # fmt: skip
def test_every_override_names_a_field_or_a_recipe(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        compose_job([*BASE, override])


def test_optional_sections_and_lists_take_their_fields():
    cfg = compose_job([*BASE, "model.audio.dropout=0.1", "model.vision.patch_size=16",
                       "stage.eval_parts=[]", "recompute=all"])  # fmt: skip
    assert cfg.model.audio.dropout == 0.1


def test_open_mappings_take_any_entry_with_or_without_plus():
    cfg = compose_job([*BASE, "+checkpoint.init_components.llm=/ckpt", "+data.paths.mine=/d"])
    assert cfg.checkpoint.init_components == {"llm": "/ckpt"}
    assert cfg.data.paths["mine"] == "/d"


def test_a_failure_marks_the_manifest_but_never_unmakes_a_completed_stage(tmp_path):
    from omni_train.checkpoint.manifest import mark_failed, read_manifest

    mark_failed(tmp_path / "new", "boom", stage="smoke")  # no manifest yet
    assert read_manifest(tmp_path / "new") == {"stage": "smoke", "status": "failed",
                                               "error": "boom"}  # fmt: skip
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "manifest.json").write_text(json.dumps({"status": "completed"}))
    mark_failed(tmp_path / "done", "a rerun died")
    assert read_manifest(tmp_path / "done") == {"status": "completed",
                                                "rerun_error": "a rerun died"}  # fmt: skip
