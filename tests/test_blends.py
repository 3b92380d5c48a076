"""Stage blends (data_blends/*.yaml): token shares, path variables, and an energon round trip."""

import io
import json
import math
import subprocess
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from megatron.energon import (
    Cooker,
    DefaultTaskEncoder,
    Sample,
    WorkerConfig,
    basic_sample_keys,
    get_savable_loader,
    get_train_dataset,
    get_val_dataset,
    reraise_exception,
    stateless,
)

from omni_train.config import blends

# Token shares from data_blends.md (fractions). Stages 0 and 1 publish no table: their entries are
# the assumptions documented in data_blends/README.md; stage 2 is ASR only.
PUBLISHED = {
    "stage0": {
        "captioning": 0.2629,
        "general VQA": 0.1804,
        "OCR": 0.1508,
        "visual grounding": 0.116,
        "documents": 0.1917,
        "GUI": 0.0982,
    },
    "stage1": {
        "captioning": 0.067,
        "general VQA": 0.0913,
        "OCR": 0.0754,
        "visual grounding": 0.0489,
        "documents": 0.1304,
        "GUI": 0.0591,
        "charts": 0.0559,
        "tables": 0.041,
        "video": 0.1354,
        "text-only reasoning": 0.2272,
        "multilingual": 0.0684,
    },
    "stage2": {"ASR": 1.0},
    "stage3": {
        "ASR": 0.227,
        "sound understanding": 0.244,
        "music understanding": 0.433,
        "speech understanding": 0.096,
    },
    "stage4": {
        "vision": 0.534,
        "text": 0.061,
        "text safety": 0.0002,
        "image safety": 0.0002,
        "short video": 0.110,
        "short video reasoning": 0.042,
        "short video omni (audio+video)": 0.028,
        "ASR": 0.011,
        "audio reasoning": 0.044,
        "audio": 0.169,
    },
    "stage5": {
        "ASR": 0.004,
        "audio": 0.113,
        "vision": 0.098,
        "text": 0.072,
        "safety": 0.001,
        "video (short)": 0.006,
        "video (medium)": 0.058,
        "video (long)": 0.033,
        "video reasoning": 0.102,
        "omni (short)": 0.003,
        "omni (medium + long)": 0.391,
        "omni reasoning": 0.118,
    },
    "stage6": {
        "long-context vision (long documents)": 0.909,
        "text": 0.073,
        "long-context text": 0.015,
        "vision": 0.003,
    },
}
# energon's loader asks for pinned memory; on CPU-only hosts torch warns once per loader.
pytestmark = pytest.mark.filterwarnings("ignore:'pin_memory' argument:UserWarning")
STAGES = [f"stage{i}" for i in range(7)]
DRAWS = 2000


def _raw(name):
    return yaml.safe_load((blends.BLENDS_DIR / f"{name}.yaml").read_text())


def test_available_blends():
    assert blends.available_blends() == STAGES


@pytest.mark.parametrize("name", STAGES)
def test_weights_reproduce_published_token_shares(name):
    shares = blends.expected_token_shares(name)
    assert list(shares) == list(PUBLISHED[name])  # same categories, in table order
    for cat, share in PUBLISHED[name].items():
        assert shares[cat] == pytest.approx(share, abs=0.005), cat
    assert sum(blends.category_weights(name).values()) == pytest.approx(1.0)


@pytest.mark.parametrize("name", STAGES)
def test_val_blend_mirrors_train(name):
    splits = blends.resolve_blend(name, blends.synthetic_paths(name, "/data"))["splits"]
    assert set(splits) == {"train", "val"}
    assert splits["val"] == splits["train"]
    for entry in splits["train"]["blend"]:
        sub = entry["subflavors"]
        assert set(sub) == {"category", "token_share", "mean_tokens"}
        assert isinstance(sub["mean_tokens"], int) and entry["weight"] > 0


def test_resolve_substitutes_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = blends.resolve_blend("stage2", {"asr": "asr_dir"})
    (entry,) = out["splits"]["train"]["blend"]
    assert entry["path"] == str(tmp_path / "asr_dir")
    assert out["__class__"] == "MetadatasetV2" and "asr" not in out
    remote = blends.resolve_blend("stage2", {"asr": "msc://bucket/asr"})
    assert remote["splits"]["val"]["blend"][0]["path"] == "msc://bucket/asr"


def test_resolve_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown blend 'stage9'.*stage0, stage1"):
        blends.resolve_blend("stage9", {})
    paths = blends.synthetic_paths("stage3", "/data")
    del paths["music_understanding"]
    with pytest.raises(ValueError, match=r"music_understanding.*data\.paths\.<var>=DIR"):
        blends.resolve_blend("stage3", paths)
    paths = {**blends.synthetic_paths("stage3", "/data"), "music_understandnig": "/x"}
    with pytest.raises(ValueError, match=r"unknown dataset path variable\(s\) music_understandnig"):
        blends.resolve_blend("stage3", paths)
    with pytest.raises(ValueError, match="unknown blend 'synthetic'"):
        blends.blend_variables("synthetic")


def test_blend_temperature_flattens_the_weights_and_keeps_the_entries(tmp_path):
    paths = blends.synthetic_paths("stage4", tmp_path)
    plain = yaml.safe_load(blends.write_metadataset("stage4", paths, tmp_path / "a").read_text())
    mds = blends.write_metadataset("stage4", paths, tmp_path / "b", temperature=4.0)
    assert "w ** (1 / 4.0)" in mds.read_text()
    hot = yaml.safe_load(mds.read_text())
    for split in ("train", "val"):
        # synthetic "vision" is two entries (image, document) sharing its weight
        a, b = plain["splits"][split]["blend"], hot["splits"][split]["blend"]
        assert [(e["path"], e["subflavors"]) for e in a] == [
            (e["path"], e["subflavors"]) for e in b
        ]
        for x, y in zip(a, b, strict=True):
            n = 2 if x["subflavors"]["category"] == "vision" else 1
            assert y["weight"] == pytest.approx((x["weight"] * n) ** 0.25 / n)
    # audio+video: 0.8 % of stage 4's samples as published, 6.9 % at T = 4
    share = Counter()
    for e in hot["splits"]["train"]["blend"]:
        share[e["subflavors"]["category"]] += e["weight"]
    omni = "short video omni (audio+video)"
    assert share[omni] / sum(share.values()) == pytest.approx(0.069, abs=0.001)
    assert blends.tempered(plain, 1.0) is plain


def test_synthetic_paths_cover_every_variable():
    used = set()
    for name in STAGES:
        paths = blends.synthetic_paths(name, "/syn")
        assert sorted(paths) == blends.blend_variables(name)
        for path in paths.values():
            for one in path if isinstance(path, list) else [path]:
                assert Path(one).parent == Path("/syn")
                assert Path(one).name in blends.SYNTHETIC_CATEGORIES
        used |= set(paths)
    # the stage 4-6 vision mix stands on images and documents, one entry each at half weight
    assert blends.synthetic_paths("stage4", "/syn")["vision"] == ["/syn/image", "/syn/document"]
    entries = blends.resolve_blend("stage4", blends.synthetic_paths("stage4", "/syn"))
    vision = [
        e for e in entries["splits"]["train"]["blend"] if e["subflavors"]["category"] == "vision"
    ]
    assert [(e["path"], e["weight"]) for e in vision] == [
        ("/syn/image", 7.3),
        ("/syn/document", 7.3),
    ]
    # No stale (e.g. misspelt) entries in the mapping either.
    assert set(_raw("synthetic")) == used


# ---- energon round trip ----------------------------------------------------------------------


@dataclass
class _Tagged(Sample):
    category: str  # from the blend entry's subflavors
    payload: str  # the synthetic category written into the shard


@stateless
def _cook(raw: dict) -> _Tagged:
    return _Tagged(
        **basic_sample_keys(raw),
        category=raw["__subflavors__"]["category"],
        payload=json.loads(raw["json"])["c"],
    )


class _TaggingEncoder(DefaultTaskEncoder):
    decoder = None  # keep the raw json bytes
    cookers = [Cooker(_cook)]


def _shard(path, keys, category):
    data = json.dumps({"c": category}).encode()
    with tarfile.open(path, "w") as tar:
        for key in keys:
            info = tarfile.TarInfo(f"{key}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    procs = []
    for cat in blends.SYNTHETIC_CATEGORIES:
        ds = root / cat
        ds.mkdir()
        _shard(ds / "train-000000.tar", [f"{cat}_t{i}" for i in range(4)], cat)
        _shard(ds / "train-000001.tar", [f"{cat}_t{i}" for i in range(4, 8)], cat)
        _shard(ds / "val-000000.tar", [f"{cat}_v{i}" for i in range(3)], cat)
        cmd = [
            sys.executable, "-m", "megatron.energon.cli.main", "prepare", str(ds),
            "--non-interactive",
            "--split-parts", "train:train-{000000..000001}.tar",
            "--split-parts", "val:val-000000.tar",
            "--sample-type", "CrudeWebdataset",
            "--no-progress",
        ]  # fmt: skip
        # Each prepare is a ~3 s interpreter start-up: run the seven side by side.
        procs.append(
            subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out.decode()[-2000:]
    return root


def _worker_config():
    # energon's default handler logs and skips failing samples; a test must see them.
    return WorkerConfig(rank=0, world_size=1, num_workers=0, global_error_handler=reraise_exception)


@pytest.mark.xdist_group("blend_draws")  # one worker: the synthetic_root fixture runs once
@pytest.mark.parametrize("name", STAGES)
def test_energon_draws_follow_the_weights(name, synthetic_root, tmp_path):
    paths = blends.synthetic_paths(name, synthetic_root)
    mds = blends.write_metadataset(name, paths, tmp_path / "mds")
    assert mds == tmp_path / "mds" / f"{name}.yaml"
    assert sorted(p.name for p in mds.parent.iterdir()) == [mds.name]  # no temp file left
    ds = get_train_dataset(
        mds,
        worker_config=_worker_config(),
        batch_size=None,
        shuffle_buffer_size=None,
        max_samples_per_sequence=None,
        task_encoder=_TaggingEncoder(),
    )
    entries = {e["subflavors"]["category"]: e for e in _raw(name)["splits"]["train"]["blend"]}
    synthetic = _raw("synthetic")
    counts = Counter()
    for _, sample in zip(range(DRAWS), get_savable_loader(ds), strict=False):
        entry = entries[sample.category]
        assert sample.__subflavors__ == entry["subflavors"]
        mapped = synthetic[entry["path"][2:-1]]  # "${var}" -> its dataset(s)
        assert sample.payload in (mapped if isinstance(mapped, list) else [mapped])
        assert "_t" in sample.__key__  # train split part only
        counts[sample.category] += 1
    assert sum(counts.values()) == DRAWS
    chi2, dof = 0.0, 0
    for cat, w in blends.category_weights(name).items():
        if w < 0.01:
            continue  # too rare to test with 2000 draws
        sd = math.sqrt(w * (1 - w) / DRAWS)
        assert abs(counts[cat] / DRAWS - w) < 4.5 * sd + 1e-9, (cat, counts[cat], w)
        chi2 += (counts[cat] - DRAWS * w) ** 2 / (DRAWS * w)
        dof += 1
    # Loose bound (about p = 1e-4 for these dof): the blend sampler is seeded, so no flakiness.
    assert chi2 < dof + 6 * math.sqrt(2 * max(dof, 1)), (chi2, counts)


@pytest.mark.xdist_group("blend_draws")
def test_energon_val_split_reads_each_dataset_once(synthetic_root, tmp_path):
    name = "stage3"
    mds = blends.write_metadataset(name, blends.synthetic_paths(name, synthetic_root), tmp_path)
    ds = get_val_dataset(
        mds, worker_config=_worker_config(), batch_size=1, task_encoder=_TaggingEncoder()
    )
    seen = Counter()
    for batch in get_savable_loader(ds):
        (category,), (key,) = batch.category, batch.__key__
        assert key.startswith("audio_v")  # the val split part of each dataset
        seen[category] += 1
    # Val concatenates the blend's datasets (weights play no part): 3 val samples per entry.
    assert seen == {cat: 3 for cat in PUBLISHED[name]}
