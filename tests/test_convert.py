"""``omni-train data convert`` from the formats users have: LLaVA/ShareGPT JSON, OpenAI
messages, NeMo ASR manifests and Parquet exported by Hugging Face ``datasets``; bad rows counted
per reason with their line; streaming (bounded memory) and parallel (identical output)."""

from __future__ import annotations

import base64
import filecmp
import io
import json
import multiprocessing
import tarfile
import tracemalloc

import numpy as np
import pytest

from omni_train.config import compose_job
from omni_train.data.loader import task_encoder
from omni_train.data.media_io import decode_audio
from omni_train.data.task_encoder import cook_raw
from omni_train.datatools import prepare
from omni_train.datatools.convert import convert
from omni_train.datatools.encode import encode_png, encode_wav
from omni_train.datatools.prepare import read_raw


def _png(seed: int, size=(24, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_png(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _wav(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(round(seconds * rate)) / rate
    return encode_wav((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate)


@pytest.fixture()
def media(tmp_path):
    root = tmp_path / "media"
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.png").write_bytes(_png(0))
    (root / "img" / "b.png").write_bytes(_png(1))
    (root / "talk.wav").write_bytes(_wav(6.0))
    return root


def _dataset(out):
    """{key: (conversation, members)} of the converted train split."""
    out_ = {}
    for key, members in read_raw(out):
        out_[key] = (json.loads(members.pop("json")), members)
    return out_


def _encodes(samples: dict) -> None:
    """Every converted sample goes through the training task encoder."""
    te = task_encoder(compose_job(["stage=smoke_omni", "model=tiny"]), training=False)
    for key, (conversation, members) in samples.items():
        raw = {"json": json.dumps(conversation).encode(), **members}
        te.encode(cook_raw(key, raw))


def test_llava_and_sharegpt_json(tmp_path, media):
    rows = [
        {  # tagged, one image
            "id": "coco/0001.jpg",
            "image": "img/a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "Noise."},
            ],
        },
        {  # untagged: the images open the first user turn
            "id": "two",
            "images": ["img/a.png", "img/b.png"],
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Compare them."},
                {"from": "gpt", "value": "Same size."},
            ],
        },
        {  # a tag without its image
            "id": "bad_tags",
            "image": "img/a.png",
            "conversations": [
                {"from": "human", "value": "<image> and <image>"},
                {"from": "gpt", "value": "?"},
            ],
        },
        {"id": "robot", "conversations": [{"from": "robot", "value": "beep"}]},
        {"id": "nothing_known"},
    ]
    src = tmp_path / "llava.json"
    src.write_text(json.dumps(rows))
    counts = convert(src, media, tmp_path / "ds", val_fraction=0.0)
    assert counts["skipped"] == {
        "bad_conversation": 1,
        "placeholder_mismatch": 1,
        "unknown_format": 1,
    }
    got = _dataset(tmp_path / "ds")
    assert sorted(got) == ["coco_0001_jpg", "two"]
    conv, members = got["coco_0001_jpg"]
    assert conv["conversation"] == [
        {"role": "user", "content": [
            {"type": "image", "member": "m0.png"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "Noise."},
    ]  # fmt: skip
    assert members == {"m0.png": (media / "img" / "a.png").read_bytes()}
    conv, _ = got["two"]
    members_named = [p.get("member") for p in conv["conversation"][1]["content"]]
    assert members_named == ["m0.png", "m1.png", None]
    assert conv["conversation"][0] == {"role": "system", "content": "Be brief."}
    _encodes(got)


def test_openai_messages_with_typed_parts_and_tags(tmp_path, media):
    png = base64.b64encode(_png(2)).decode()
    wav = base64.b64encode(_wav(1.0)).decode()
    rows = [
        {
            "key": "typed",
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "Look and listen."},
                    {"type": "image_url", "image_url": {"url": "img/b.png"}},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                    {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}]},
                {"role": "assistant", "content": "Two images and a tone."},
            ],
        },
        {  # LLaMA-Factory's ShareGPT: string content with tags + a media list
            "key": "tags",
            "messages": [
                {"role": "user", "content": "<audio>What is said?"},
                {"role": "assistant", "content": "Nothing."},
            ],
            "audios": ["talk.wav"],
        },
        {
            "key": "remote",
            "messages": [
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]},
                {"role": "assistant", "content": "?"},
            ],
        },
        {
            "key": "outside",
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": "../secret.png"}]},
                {"role": "assistant", "content": "?"},
            ],
        },
    ]  # fmt: skip
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    counts = convert(src, media, tmp_path / "ds", val_fraction=0.0)
    assert counts["converted"] == 2
    assert counts["skipped"] == {"bad_json": 1, "outside_media": 1, "remote_media": 1}
    got = _dataset(tmp_path / "ds")
    conv, members = got["typed"]
    kinds = [p["type"] for p in conv["conversation"][0]["content"]]
    assert kinds == ["text", "image", "image", "audio"]
    assert sorted(members) == ["m0.png", "m1.png", "m2.wav"]  # the data URI's type sniffed
    assert members["m1.png"] == _png(2) and members["m2.wav"] == _wav(1.0)
    assert got["tags"][1] == {"m0.wav": (media / "talk.wav").read_bytes()}
    _encodes(got)


def test_nemo_manifest_cuts_segments(tmp_path, media):
    rows = [
        {"audio_filepath": "talk.wav", "duration": 6.0, "text": "the whole file"},
        {"audio_filepath": "talk.wav", "duration": 1.5, "offset": 2.0, "text": "a segment"},
        {"audio_filepath": "talk.wav", "duration": 1.0, "offset": 9.0, "text": "past the end"},
        {"audio_filepath": "gone.wav", "duration": 1.0, "text": "missing"},
    ]
    src = tmp_path / "manifest.json"  # NeMo manifests are JSON lines whatever their suffix
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = src.rename(tmp_path / "manifest.jsonl")
    counts = convert(src, media, tmp_path / "ds", val_fraction=0.0, asr_prompt="Transcribe:")
    assert counts["converted"] == 2
    assert counts["skipped"] == {"bad_media": 1, "missing_media": 1}
    got = list(_dataset(tmp_path / "ds").values())
    by_text = {g[0]["conversation"][1]["content"]: g for g in got}
    whole, segment = by_text["the whole file"], by_text["a segment"]
    assert segment[0]["conversation"][0]["content"][0] == {"type": "text", "text": "Transcribe:"}
    assert whole[1] == {"m0.wav": (media / "talk.wav").read_bytes()}  # stored as it was
    (flac,) = segment[1].values()
    assert decode_audio(flac).shape[0] == 1.5 * 16000  # the [2.0, 3.5) s segment, 16 kHz
    _encodes(dict(enumerate(got)))


def test_parquet_from_hf_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    vqa = datasets.Dataset.from_dict(
        {
            "messages": [
                [
                    {"role": "user", "content": "<image>What?"},
                    {"role": "assistant", "content": "A"},
                ],
                [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "B."}],
            ],
            "images": [
                [{"bytes": _png(3), "path": None}],
                [{"bytes": b"not an image", "path": None}],
            ],
        }
    ).cast_column("images", datasets.Sequence(datasets.Image()))
    vqa.to_parquet(str(tmp_path / "vqa.parquet"))
    counts = convert(tmp_path / "vqa.parquet", None, tmp_path / "ds", val_fraction=0.0)
    assert counts["converted"] == 1 and counts["skipped"] == {"bad_media": 1}
    ((conv, members),) = _dataset(tmp_path / "ds").values()
    assert members == {"m0.png": _png(3)}
    asr = datasets.Dataset.from_dict(
        {"audio": [{"bytes": _wav(1.0), "path": "x.wav"}], "text": ["hello"]}
    ).cast_column("audio", datasets.Audio(decode=False))
    asr.to_parquet(str(tmp_path / "asr.parquet"))
    counts = convert(tmp_path / "asr.parquet", None, tmp_path / "asr", val_fraction=0.0)
    assert counts["converted"] == 1
    got = _dataset(tmp_path / "asr")
    ((conv, members),) = got.values()
    assert conv["conversation"][1] == {"role": "assistant", "content": "hello"}
    _encodes(got)


def test_conversion_streams_and_parallel_output_is_identical(tmp_path):
    """2,000 rows of 12 KB images: the converting process never holds more than a window of
    them (peak Python allocations < 1/5 of the data), and 2 workers write byte-identical
    shards to 1."""
    media = tmp_path / "media"
    media.mkdir()
    for i in range(8):
        (media / f"{i}.png").write_bytes(_png(i, (64, 64)))
    rows = [
        {"key": f"r{i:05d}", "image": f"{i % 8}.png",
         "conversations": [{"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "x"}]}
        for i in range(2000)
    ]  # fmt: skip
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    total = sum(len((media / f"{i % 8}.png").read_bytes()) for i in range(2000))
    tracemalloc.start()
    one = convert(src, media, tmp_path / "one", samples_per_shard=500, window=32)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert one["converted"] == 2000 and peak < total / 5, (peak, total)
    tracemalloc.start()
    two = convert(src, media, tmp_path / "two", samples_per_shard=500, workers=2, window=32)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # one window of results at a time; the pool's own pickling buffers count here too
    assert two == one and peak < total / 2, (peak, total)
    shards = sorted(p.name for p in (tmp_path / "one").glob("*.tar"))
    assert shards == sorted(p.name for p in (tmp_path / "two").glob("*.tar")) and shards
    for name in shards:
        assert filecmp.cmp(tmp_path / "one" / name, tmp_path / "two" / name, shallow=False)


def _index_in_fork(out) -> int:
    """Runs in a forked child: index a dataset there; the pid of the helper that did it."""
    prepare.write_dataset(out, [_sample("c0")], [_sample("c1")])
    return prepare._helper[1].pid


def _sample(key: str) -> prepare.RawSample:
    conversation = {"conversation": [{"role": "user", "content": "<image>"}]}
    return prepare.RawSample(key, conversation, {"img0.png": _png(0)})


def test_indexing_runs_in_one_helper_that_reports_energon_errors(tmp_path):
    """energon prepare runs in a single-threaded helper (not forked from this threaded
    process): its failure comes back with energon's own words, the same helper indexes the
    next dataset, and a forked child of ours starts its own helper instead of sharing our
    pipes."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for n in range(2):  # the same key in two shards: energon refuses the dataset
        with tarfile.open(bad / f"train-{n:06d}.tar", "w") as tar:
            info = tarfile.TarInfo("a.json")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(RuntimeError, match='duplicate keys.*\n.*Example duplicate key: "a"'):
        prepare.energon_prepare(bad, ["train"])
    helper = prepare._helper[1]
    prepare.write_dataset(tmp_path / "ok", [_sample("k0"), _sample("k1")], [_sample("k2")])
    assert prepare._helper[1] is helper and helper.poll() is None
    assert [key for key, _ in read_raw(tmp_path / "ok")] == ["k0", "k1"]
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child_helper = pool.apply(_index_in_fork, (tmp_path / "child",))
    assert child_helper != helper.pid and helper.poll() is None
    assert [key for key, _ in read_raw(tmp_path / "child")] == ["c0"]
