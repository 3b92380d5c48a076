"""The energon data pipeline end to end: synth -> energon prepare -> task encoder -> loader on
real ranks -> stage. Exact token counts, bad-sample accounting, loader-state restore."""

from __future__ import annotations

import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from launch import launch

from omni_train.config import compose_job
from omni_train.data import REASONS, tokens
from omni_train.data.chat import layout
from omni_train.data.conversation import parse_conversation
from omni_train.data.loader import task_encoder
from omni_train.data.media_io import VideoInfo, sample_video_timestamps
from omni_train.data.plans import AudioPlan, ImagePlan, VideoPlan
from omni_train.data.task_encoder import cook_raw
from omni_train.datatools.encode import encode_png, encode_wav
from omni_train.datatools.prepare import RawSample, read_raw, synthesize, write_dataset
from omni_train.datatools.synth_media import CATEGORIES, synth_samples
from omni_train.stage.launch import torchrun

NUM_SYNTH = 16
PROBE = str(Path(__file__).parent / "data_probe.py")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synthesize(root, NUM_SYNTH, seed=0)
    return root


def probe(nproc: int, mode: str, *args) -> list[dict]:
    out = Path(args[1])
    torchrun(nproc, PROBE, mode, *map(str, args), timeout=600)
    return [json.loads((out / f"{mode}_rank{r}.json").read_text()) for r in range(nproc)]


def test_synth_is_deterministic_and_idempotent(synth, tmp_path):
    again = tmp_path / "again"
    synthesize(again, NUM_SYNTH, seed=0)
    for category in CATEGORIES:
        shards = sorted(p.name for p in (synth / category).glob("*.tar"))
        assert shards and shards == sorted(p.name for p in (again / category).glob("*.tar"))
        for name in shards:
            assert (synth / category / name).read_bytes() == (again / category / name).read_bytes()
    stamp = (again / "text" / "train-000000.tar").stat().st_mtime_ns
    synthesize(again, NUM_SYNTH, seed=0)  # same arguments: nothing is rewritten
    assert (again / "text" / "train-000000.tar").stat().st_mtime_ns == stamp


def _plans_from_truth(te, key: str, conversation: dict, truth: dict) -> list:
    """What the encoder must plan for a sample, from what the generator encoded (not from
    probing the files)."""
    v, rate = te.vision, te.audio_cfg.sample_rate
    images, videos, audio = iter(truth["images"]), iter(truth["videos"]), iter(truth["audio"])
    plans = []
    for turn in conversation["conversation"]:
        for part in turn["content"] if isinstance(turn["content"], list) else []:
            if part["type"] == "image":
                w, h = next(images)
                plans.append(
                    ImagePlan(*tokens.image_grid(w, h, patch=16, min_patches=4, max_patches=64))
                )
            elif part["type"] == "audio":
                t = next(audio)
                n = round(t["num_samples"] * rate / t["sample_rate"])
                plans.append(AudioPlan(n, _clip_tokens(te, n)))
            elif part["type"] == "video":
                t = next(videos)
                info = VideoInfo(
                    t["num_frames"],
                    t["fps"],
                    t["num_frames"] / t["fps"],
                    t["width"],
                    t["height"],
                    t["has_audio"],
                )
                stamps = sample_video_timestamps(info, te.video_fps, te.max_video_frames)
                budget = te._patch_budget(key, part["member"])
                rows, cols = tokens.frame_grid(t["width"], t["height"], budget)
                clips = ()
                if part.get("audio"):
                    n = round(t["audio_samples"] * rate / t["audio_rate"])
                    clips = _clip_tokens(te, n)
                period_ms = int(1000 / t["fps"])  # the released processor's label arithmetic
                # the frame the decoder takes for time s: the first at or after s - period / 2
                index = [min(math.ceil(s * t["fps"] - 0.5), t["num_frames"] - 1) for s in stamps]
                labels = tuple(i * period_ms / 1000 for i in index)
                plans.append(VideoPlan(tuple(stamps), labels, rows, cols, v.tubelet_frames, clips))
    return plans


def _clip_tokens(te, n: int) -> tuple[int, ...]:
    """Tokens per encoder input of an ``n``-sample stream: one input (processor layout) or
    30 s clips (report)."""
    a = te.audio_cfg
    clip = 0 if te.layout.name == "processor" else a.clip_seconds
    return tuple(tokens.audio_clip_tokens(c, a) for c in tokens.audio_clip_samples(n, a, clip))


@pytest.mark.parametrize("data_layout", ["processor", "report"])
def test_encoded_length_equals_accounting_for_every_synthetic_sample(synth, data_layout):
    """Every synthetic sample, in both layouts: the task encoder's real output (tokens, decoded
    media shapes, audio clips) equals the accounting computed from what the generator wrote."""
    cfg = compose_job(["stage=smoke_omni", "model=tiny", f"data.layout={data_layout}"])
    te = task_encoder(cfg, training=True)
    ids = cfg.model.media_tokens
    by_key = {s.key: s for c in CATEGORIES for s in synth_samples(c, NUM_SYNTH, 0)}
    seen = 0
    for category in CATEGORIES:
        for split in ("train", "val"):
            for key, members in read_raw(synth / category, split):
                truth = by_key[key]
                sample = te.encode(cook_raw(key, members, category))
                plans = _plans_from_truth(te, key, truth.conversation, truth.truth)
                turns = parse_conversation(members["json"], set(members) - {"json"})
                lay = layout(turns, plans, te.tok, te.layout)
                assert (sample.tokens.tolist(), True) == (lay.materialize()[0], True), key
                images = [p for p in plans if isinstance(p, ImagePlan)]
                videos = [p for p in plans if isinstance(p, VideoPlan)]
                assert [tuple(x.shape) for x in sample.images] == [
                    (3, p.rows * 16, p.cols * 16) for p in images
                ]
                assert [tuple(x.shape) for x in sample.videos] == [
                    (len(p.timestamps), 3, p.rows * 16, p.cols * 16) for p in videos
                ]
                n_img = sum(p.num_tokens for p in images)
                n_vid = sum(p.num_groups * p.tokens_per_group for p in videos)
                n_aud = sum(p.num_tokens for p in plans if isinstance(p, AudioPlan))
                n_aud += sum(p.audio_tokens for p in videos)
                counts = [int((sample.tokens == i).sum()) for i in (ids.image, ids.audio)]
                assert counts == [n_img + n_vid, n_aud], key  # video frames: image placeholders
                clips = [
                    c for p in plans for c in getattr(p, "clips", getattr(p, "audio_clips", ()))
                ]
                assert [
                    tokens.audio_clip_tokens(x.shape[0], te.audio_cfg) for x in sample.audio
                ] == clips
                assert sample.loss_mask.sum() > 0
                seen += 1
    assert seen == NUM_SYNTH * len(CATEGORIES)


def test_real_encoders_output_one_feature_per_placeholder(synth, tmp_path):
    """All synthetic samples through the tiny model's RADIO and FastConformer encoders."""
    (result,) = probe(1, "encoders", synth, tmp_path)
    assert result == {c: NUM_SYNTH for c in CATEGORIES}


def test_all_stage_blends_round_trip_on_two_ranks(synth, tmp_path):
    """synth -> prepare -> each stage's metadataset -> loader on 2 ranks -> batches whose
    placeholders match their media; the ranks read disjoint samples."""
    r0, r1 = probe(2, "blends", synth, tmp_path)
    assert sorted(r0) == [f"stage{i}" for i in range(7)]
    for name in r0:
        assert len(r0[name]["keys"]) == len(r1[name]["keys"]) == 12
        assert not set(r0[name]["keys"]) & set(r1[name]["keys"]), name
        assert r0[name]["categories"], name
    assert r0["stage2"]["categories"] == ["ASR"]
    assert set(r0["stage6"]["categories"]) <= {
        "long-context vision (long documents)",
        "text",
        "long-context text",
        "vision",
    }


def test_loader_state_restores_the_identical_next_batch(synth, tmp_path):
    r0, r1 = probe(2, "restore", synth, tmp_path)
    for r in (r0, r1):
        assert r["same_tokens"] and r["same_media"]
        assert r["keys"] == r["restored_keys"]
    assert r0["totals"] == r1["totals"]  # global totals: identical on every rank
    assert r0["totals"]["num_samples"] == 3 * 4  # three steps of global batch 4


# -- bad samples ---------------------------------------------------------------------------

GOOD_PER_SHARD = 6


def _conv(*turns) -> dict:
    return {"conversation": list(turns)}


def _wav(seconds: float) -> bytes:
    import numpy as np

    return encode_wav(np.full(int(seconds * 16000), 0.1, dtype=np.float32), 16000)


def _bad_samples(shard: int, png: bytes) -> list[RawSample]:
    """One sample per skip reason, keyed ``bad<shard>_<reason>``. The undecodable image is
    a valid PNG here; _corrupt damages it inside the written shard."""
    ok = {"role": "assistant", "content": "ok"}
    ask = lambda kind, m: {"role": "user", "content": [{"type": kind, "member": m}]}  # noqa: E731
    garbage_mp4 = b"\x00\x00\x00\x18ftypmp42" + b"\x07" * 3000
    cases = {
        "bad_json": ({"turns": []}, {}),
        "unknown_role": (_conv({"role": "bot", "content": "x"}, ok), {}),
        "bad_content": (_conv({"role": "user", "content": [{"type": "smell"}]}, ok), {}),
        "no_assistant_turn": (_conv({"role": "user", "content": "hi"}), {}),
        "missing_member": (_conv(ask("image", "x.png"), ok), {"y.png": png}),
        "placeholder_mismatch": (_conv({"role": "user", "content": "see <image>"}, ok), {}),
        "undecodable_image": (_conv(ask("image", "a.png"), ok), {"a.png": png}),
        "undecodable_video": (_conv(ask("video", "v.mp4"), ok), {"v.mp4": garbage_mp4}),
        "undecodable_audio": (_conv(ask("audio", "a.wav"), ok), {"a.wav": b"RIFF\0\0junk" * 9}),
        # 0.01 s: one encoder frame, below the encoder's floor (two frames, 0.08 s: one frame
        # alone in a micro-batch breaks the conformer's BatchNorm); refused when planned
        "audio_too_short": (_conv(ask("audio", "b.wav"), ok), {"b.wav": _wav(0.01)}),
        "too_long": (
            _conv({"role": "user", "content": "hi"}, dict(ok, content="word " * 2000)),
            {},
        ),
    }
    assert sorted(cases) == sorted(REASONS)
    return [RawSample(f"bad{shard}_{r}", doc, members) for r, (doc, members) in cases.items()]


def _ask_audio(member: str) -> tuple[dict, dict]:
    ask = {"role": "user", "content": [{"type": "audio", "member": member}]}
    return ask, {"role": "assistant", "content": "ok"}


def _corrupt(shard: Path) -> None:
    """Overwrite the pixel data of every ``*undecodable_image.a.png`` member in the tar file
    itself (its header stays intact): bit rot in a shard, not a bad sample at write time."""
    with tarfile.open(shard) as tar:
        spots = [(m.offset_data, m.size) for m in tar if m.name.endswith("undecodable_image.a.png")]
    with shard.open("r+b") as f:
        for offset, size in spots:
            f.seek(offset + 60)
            f.write(b"\xff" * (size - 80))


@pytest.fixture(scope="module")
def corrupted(synth, tmp_path_factory) -> tuple[Path, list[str]]:
    """2 train shards, each: the 10 bad samples first, then 6 good ones (images, text,
    audio, video). Bad samples come first so a full pass over the good samples has met every
    bad one (energon reads a shard in order without a shuffle buffer)."""
    import numpy as np

    png = encode_png(np.random.default_rng(0).integers(0, 255, (64, 48, 3), dtype=np.uint8))
    good = [
        RawSample(f"good_{c}_{k}", json.loads(m.pop("json")), m)
        for c in ("image", "text", "audio", "video")
        for k, m in list(read_raw(synth / c))[:3]
    ]
    shards = [
        _bad_samples(i, png) + good[i * GOOD_PER_SHARD : (i + 1) * GOOD_PER_SHARD] for i in range(2)
    ]
    short = RawSample("val_short", _conv(*_ask_audio("b.wav")), {"b.wav": _wav(0.01)})
    val = [short] + [
        RawSample(f"val_{k}", json.loads(m.pop("json")), m)
        for k, m in read_raw(synth / "text", "val")
    ]
    out = tmp_path_factory.mktemp("corrupted") / "ds"
    write_dataset(out, shards[0] + shards[1], val, samples_per_shard=len(shards[0]))
    for shard in out.glob("train-*.tar"):
        _corrupt(shard)  # in place, same sizes: energon's index still holds
    return out, [s.key for s in good[: 2 * GOOD_PER_SHARD]]


def test_corrupted_shard_one_epoch_two_ranks_exact_skips_no_good_sample_lost(corrupted, tmp_path):
    data, good = corrupted
    r0, r1 = probe(2, "epoch", data, tmp_path, GOOD_PER_SHARD // 2)  # micro-batches of 2
    assert sorted(r0["keys"] + r1["keys"]) == sorted(good)  # every good sample, once
    assert r0["totals"] == r1["totals"]
    assert r0["totals"]["skipped"] == {reason: 2 for reason in REASONS}
    assert r0["totals"]["num_read"] == 2 * (len(REASONS) + GOOD_PER_SHARD)


def test_global_packing_one_pass_two_ranks_every_good_sample_once(corrupted, tmp_path):
    """Both ranks plan the same stream and keep disjoint bins: every good sample is trained on
    exactly once across ranks, every bad one counted exactly once, none lost."""
    data, good = corrupted
    r0, r1 = probe(2, "packed", data, tmp_path)
    keys0 = [k for b in r0["bins"] for k in b]
    keys1 = [k for b in r1["bins"] for k in b]
    assert not set(keys0) & set(keys1)
    assert sorted(keys0 + keys1) == sorted(good)
    assert len(r0["bins"]) == len(r1["bins"])  # one bin per rank per round: ranks in step
    # planning skips are counted by rank 0 only; a sample that fails to decode (the corrupted
    # image: its header is intact) by the rank its bin was dealt to
    total = Counter(r0["skipped"]) + Counter(r1["skipped"])
    assert total == {reason: 2 for reason in REASONS}
    assert set(r1["skipped"]) <= {"undecodable_image"}
    assert r0["num_read"] == 2 * (len(REASONS) + GOOD_PER_SHARD) and r1["num_read"] == 0


def _packed_pass(data: Path, tmp_path: Path, monkeypatch, cache_mib: int) -> tuple[list, int]:
    """One in-process pass of the packed loader over ``data``: (batches, plan() calls)."""
    from megatron.energon import WorkerConfig, get_loader, get_val_dataset, reraise_exception

    from omni_train.data.task_encoder import OmniTaskEncoder

    calls = []
    plan = OmniTaskEncoder.plan
    monkeypatch.setattr(OmniTaskEncoder, "plan", lambda te, s: calls.append(1) or plan(te, s))
    cfg = compose_job(
        [
            "stage=smoke_omni",
            "model=tiny",
            f"data.path={data}",
            "data.blend=null",
            "trainer.seq_length=512",
            "trainer.micro_batch_size=1",
            "data.packing.enabled=true",
            "data.packing.buffer_size=6",
            f"data.packing.plan_cache_mib={cache_mib}",
            f"checkpoint.output_dir={tmp_path}",
        ]
    )
    worker = WorkerConfig(
        rank=0, world_size=1, num_workers=0, global_error_handler=reraise_exception
    )
    te = task_encoder(cfg, training=True)
    ds = get_val_dataset(
        data, split_part="train", worker_config=worker, batch_size=1, task_encoder=te
    )
    return list(get_loader(ds)), len(calls)


@pytest.mark.parametrize("category", ["image", "audio_video"])
def test_plan_cache_packs_the_same_bins_without_planning_twice(
    synth, tmp_path, monkeypatch, category
):
    """The packer's planned samples wait in memory (``plan_cache_mib``) instead of being read
    and planned again when their bin is due: the same packed sequences, media and counts, and
    every sample planned once instead of twice."""
    data = synth / category
    cached, num_cached = _packed_pass(data, tmp_path / "a", monkeypatch, 256)
    reread, num_reread = _packed_pass(data, tmp_path / "b", monkeypatch, 0)
    num_samples = sum(len(b.keys) for b in cached)
    assert num_samples == NUM_SYNTH - NUM_SYNTH // 8  # every train sample of the split (val: 1/8)
    assert num_cached == num_samples and num_reread == 2 * num_samples
    assert len(cached) == len(reread)
    for a, b in zip(cached, reread, strict=True):
        assert a.keys == b.keys and a.num_read == b.num_read and a.skipped == b.skipped
        for name in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        for kind in ("images", "videos", "audio"):
            got, want = getattr(a.media, kind), getattr(b.media, kind)
            assert len(got) == len(want) and all(map(torch.equal, got, want)), kind


def test_plan_cache_keeps_samples_up_to_its_byte_cap():
    from types import SimpleNamespace

    from omni_train.data.packed import PlanCache

    def sample(num_bytes: int) -> SimpleNamespace:
        return SimpleNamespace(members={"json": b"{}", "m0.png": b"x" * (num_bytes - 2)})

    cache = PlanCache(10)
    kept, too_big, fits = sample(6), sample(6), sample(4)
    for sid, s in enumerate((kept, too_big, fits)):
        cache.put(sid, s)
    assert len(cache) == 2 and cache.size == 10
    assert cache.pop(1) is None  # not kept: its bin fetches it again by restore key
    assert cache.pop(0) is kept and cache.size == 4 and cache.pop(0) is None


def _corrupted_stage(data: Path) -> list[str]:
    """2 data-parallel ranks, one pass over the corrupted shards: 3 steps x global batch 4 =
    the 12 good samples."""
    return [
        "stage=smoke_omni",
        "model=tiny",
        "parallel=single",
        f"data.path={data}",
        "data.blend=null",
        "data.synthetic_root=null",
        "data.num_workers=0",
        "data.shuffle_buffer_size=0",
        "data.max_samples_per_sequence=0",
        "trainer.seq_length=512",
        "data.packing.enabled=false",
        "trainer.micro_batch_size=2",
        "trainer.train_steps=3",
        "trainer.save_interval=0",
        "trainer.eval_iters=1",
    ]


def test_stage_on_corrupted_data_finishes_and_reports_exact_skips(corrupted, tmp_path):
    data, good = corrupted
    stage = _corrupted_stage(data)
    m = launch(2, tmp_path / "ok", *stage, "data.max_skip_fraction=0.7")
    assert m["status"] == "completed"
    assert m["data"]["skipped"] == {reason: 2 for reason in REASONS}
    assert m["data"]["num_samples"] == len(good) and m["data"]["num_read"] == 34
    assert m["data"]["eval_skipped"] == {"audio_too_short": 1}  # counted at eval time too


@pytest.mark.slow
def test_too_many_skips_stop_the_stage_with_the_reasons(corrupted, tmp_path):
    data, _ = corrupted
    stage = _corrupted_stage(data)
    with pytest.raises(RuntimeError, match=r"samples read were skipped .* data.max_skip_fraction"):
        launch(
            2,
            tmp_path / "strict",
            *stage,
            "data.max_skip_fraction=0.1",
            "data.skip_check_min_samples=10",
        )
    failed = json.loads((tmp_path / "strict" / "manifest.json").read_text())
    assert failed["status"] == "failed" and "too_long" in failed["error"]


PACKED = [
    "data.packing.enabled=true",
    "trainer.micro_batch_size=1",
    "trainer.global_batch_size=2",
    "data.packing.buffer_size=24",
]


@pytest.mark.slow  # the default suite resumes packed omni data after a signal (test_faults)
@pytest.mark.parametrize("packing", ["unpacked", "packed"])
def test_stage_resume_on_energon_data_equals_uninterrupted(synth, tmp_path, packing):
    """2 + 2 steps == 4 steps on the omni data: the checkpoint's loader state continues at the
    same sample (DP=2, one decoding worker per rank). Packed: the checkpoint falls in the
    middle of the packer's buffer (24 planned samples, ~7 per bin, one bin per rank a step)."""
    stage = [
        "stage=smoke_omni",
        "model=tiny",
        "parallel=single",
        f"data.synthetic_root={synth}",
        "trainer.train_steps=4",
        "trainer.save_interval=0",
        "trainer.eval_iters=1",
        *(PACKED if packing == "packed" else ["data.packing.enabled=false"]),
    ]
    whole = launch(2, tmp_path / "whole", *stage)
    first = launch(2, tmp_path / "split", *stage, "trainer.exit_after_steps=2")
    assert first["status"] == "interrupted"
    second = launch(2, tmp_path / "split", *stage)
    assert second["losses"] == whole["losses"]
    assert second["data"] == whole["data"] and second["tokens"] == whole["tokens"]
    assert torch.isfinite(torch.tensor(whole["losses"])).all()


def test_convert_jsonl_with_media_folder(tmp_path):
    """The users' layout (JSONL + media folder) -> a prepared dataset the task encoder reads;
    a line with bad JSON or a missing file is counted, not converted."""
    from omni_train.datatools.convert import convert as convert_jsonl

    media = tmp_path / "media"
    (media / "imgs").mkdir(parents=True)
    sample = synth_samples("image", 1, 0)[0]
    (data,) = sample.members.values()
    (media / "imgs" / "cat.png").write_bytes(data)

    def ask(path: str) -> dict:
        parts = [{"type": "text", "text": "What?"}, {"type": "image", "member": path}]
        return _conv({"role": "user", "content": parts}, {"role": "assistant", "content": "A."})

    lines = [
        json.dumps({"key": "first", **ask("imgs/cat.png")}),
        "{not json",
        json.dumps(ask("imgs/missing.png")),
        json.dumps(ask("imgs/cat.png")),  # no key: one is made from the line number
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    counts = convert_jsonl(tmp_path / "train.jsonl", media, tmp_path / "ds", val_fraction=0.0)
    assert counts == {
        "converted": 2,
        "skipped": {"bad_json": 1, "missing_media": 1},
        "train": 2,
        "val": 0,
    }
    assert (tmp_path / "ds" / ".nv-meta" / "split.yaml").is_file()
    raw = dict(read_raw(tmp_path / "ds"))
    assert sorted(raw) == ["first", "train_000000004"]
    cfg = compose_job(["stage=smoke_omni", "model=tiny"])
    te = task_encoder(cfg, training=True)
    for key, members in raw.items():
        assert set(members) == {"json", "m0.png"} and members["m0.png"] == data
        assert len(te.encode(cook_raw(key, members)).images) == 1


def test_data_config_errors_before_any_process_starts(synth, tmp_path):
    from omni_train.config import validate

    def check(*overrides: str) -> None:
        validate(compose_job(["stage=smoke_omni", "model=tiny", *overrides]), 1)

    check(f"data.synthetic_root={synth}")  # the good case
    with pytest.raises(ValueError, match=r"does not exist; create it with: omni-train data synth"):
        check(f"data.synthetic_root={tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match=r"data.blend='stage9' is not in .* valid: stage0"):
        check(f"data.synthetic_root={synth}", "data.blend=stage9")
    with pytest.raises(ValueError, match=r"missing dataset path variable\(s\) .*\+data.paths"):
        check("data.synthetic_root=null")
    with pytest.raises(ValueError, match=r"is not prepared for energon"):
        check("data.blend=null", "data.synthetic_root=null", f"data.path={tmp_path}")
    (tmp_path / "ds").mkdir()
    synthesize_one = write_dataset(tmp_path / "ds", [RawSample("a", {"conversation": []}, {})], [])
    with pytest.raises(ValueError, match=r"no 'val' shards but trainer.eval_iters=2; set"):
        check("data.blend=null", "data.synthetic_root=null", f"data.path={synthesize_one}")
    check(
        "data.blend=null",
        "data.synthetic_root=null",
        f"data.path={synthesize_one}",
        "trainer.eval_iters=0",
    )
    with pytest.raises(ValueError, match=r"data.kind=energon feeds conversations with media"):
        check(
            f"data.synthetic_root={synth}",
            "model.vision=null",
            "model.audio=null",
            "stage.trainable=[llm]",
        )


@pytest.mark.parametrize(("seconds", "kept"), [(0.01, False), (0.079, False), (0.08, True),
                                               (0.1, True), (0.45, True)])  # fmt: skip
def test_short_spoken_words_are_kept_down_to_the_encoders_floor(seconds, kept):
    """A recording of one spoken word (0.4 s) trains, with the released processor's token
    count; below two encoder frames (0.08 s) the sample is skipped, as it is planned."""
    from omni_train.data.conversation import SampleError

    cfg = compose_job(["stage=smoke_omni", "model=tiny"])
    te = task_encoder(cfg, training=True)
    members = {"json": json.dumps(_conv(*_ask_audio("w.wav"))).encode(), "w.wav": _wav(seconds)}
    n = int(seconds * 16000)
    if not kept:
        with pytest.raises(SampleError, match="the encoder takes streams of at least 0.08 s"):
            te.encode(cook_raw("word", members))
        return
    sample = te.encode(cook_raw("word", members))
    assert [tuple(a.shape) for a in sample.audio] == [(n,)]
    want = tokens.audio_clip_tokens(n, cfg.model.audio)
    assert int((sample.tokens == cfg.model.media_tokens.audio).sum()) == want
