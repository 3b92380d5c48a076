"""The released model, exactly: a tiny random reference model of transformers 5.23
(``tests/hf_reference.py``) -> ``omni-train checkpoint import-hf`` -> omni-train's logits equal
the reference's on every modality (1 process and TP=2), export -> the same tensors bit for bit,
loadable by transformers; imports of the LM, RADIO and Parakeet alone; refusals.

The CLI runs in subprocesses (as users run it); the reference runs in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import hf_reference
import pytest
import torch
from launch import launch_stage
from safetensors.torch import load_file, save_file

from omni_train.stage.launch import torchrun

TOL = 1e-5  # max |logit difference| / max |reference logit|, fp32
# one worker builds the module fixture (the reference, its import, its logits) for every test
pytestmark = pytest.mark.xdist_group("hf_checkpoint")


def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "omni_train.cli", "checkpoint", *args],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def import_hf(src: Path, out: Path, *overrides: str, ok: bool = True):
    return cli("import-hf", str(src), "--out", str(out), *overrides, ok=ok)


def convert(src: Path, out: Path, *overrides: str):
    """The import in this process (the CLI's start-up cost is paid by the fixture's import)."""
    from omni_train.hf.convert import import_hf as run

    return run(src, out, list(overrides))


def plain_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """A torch_dist checkpoint's tensors by key."""
    from megatron.core.dist_checkpointing.serialization import load_plain_tensors

    from omni_train.config import ParallelConfig
    from omni_train.parallel.state import local_world
    from omni_train.platform import setup

    with local_world(ParallelConfig(), setup(), 0):
        return load_plain_tensors(str(ckpt))


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Keys both hold whose tensors are not bit-identical."""
    return [k for k in a if k in b and not torch.equal(a[k], b[k])]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The reference model saved as transformers saves it (released names), its import, the
    parity samples and the reference's logits on them."""
    from omni_train.hf import compare
    from omni_train.hf.convert import _job, model_from_section, resolve_checkpoint

    root = tmp_path_factory.mktemp("released")
    ref_dir = hf_reference.save(root / "reference")
    jsonl = compare.write_parity_set(root / "parity")
    imported = root / "imported"
    import_hf(ref_dir, imported, *hf_reference.TINY_DATA)
    _, section, _ = resolve_checkpoint(imported)
    cfg = _job(model_from_section(section), [], "fp32")
    samples = compare.samples_from_jsonl(jsonl, jsonl.parent, cfg)
    ref = compare.load_reference(ref_dir)
    logits = [compare.reference_logits(ref, s, cfg.model)[0] for s in samples]
    return {
        "root": root,
        "ref": ref,
        "cfg": cfg,
        "ref_dir": ref_dir,
        "jsonl": jsonl,
        "imported": imported,
        "samples": samples,
        "logits": logits,
    }


def test_import_writes_a_checkpoint_with_a_manifest(released):
    manifest = json.loads((released["imported"] / "omni_train_import.json").read_text())
    assert manifest["source_kind"] == "omni"
    assert manifest["components"] == [
        "llm",
        "vision_encoder",
        "vision_projector",
        "audio_encoder",
        "audio_projector",
    ]
    assert manifest["model"]["vision"]["cpe_align_corners"] is False
    assert manifest["model"]["audio"]["use_bias"] is False
    assert (released["imported"] / "hf_config.json").is_file()


def test_compare_hf_every_modality_within_1e5_on_one_process(released):
    proc = cli(
        "compare-hf",
        str(released["ref_dir"]),
        str(released["imported"]),
        "--data",
        str(released["jsonl"]),
        "--media",
        str(released["jsonl"].parent),
        "--json",
    )
    rows = json.loads(proc.stdout[proc.stdout.index("[") :])
    names = [r["sample"] for r in rows]
    assert names == ["text", "image", "images", "video_odd_frames", "audio_35s", "audio_video"]
    for r in rows:
        assert r["rel_diff"] < TOL, r
        assert r["cosine"] > 1 - 1e-6, r
        assert abs(r["loss"] - r["loss_reference"]) < 1e-4 * r["loss_reference"], r
    paths = {r["sample"]: r["path"] for r in rows}
    assert paths["images"] == "forward" and paths["audio_video"] == "components"


def test_logits_match_reference_at_tp2(released, tmp_path):
    out = tmp_path / "logits.pt"
    torchrun(
        2,
        str(Path(__file__).with_name("hf_probe.py")),
        str(released["imported"]),
        str(released["jsonl"]),
        str(released["jsonl"].parent),
        str(out),
        "parallel=tp2",
    )
    ours = torch.load(out)
    for sample, mine, ref in zip(released["samples"], ours, released["logits"], strict=True):
        rel = (mine - ref).abs().max().item() / ref.abs().max().item()
        assert rel < TOL, f"{sample.name}: {rel:.2e}"


NEW_TOKENS = 12  # greedy tokens per prompt in the generation tests


@pytest.fixture(scope="module")
def reference_answers(released):
    """transformers' greedy ``generate`` (its own cache) on each parity sample's prompt: the
    conversation before its last assistant turn with the generation prompt. Text and images go
    through the released class's ``generate`` on ids and pixels; video and audio through it on
    the reference's own embeddings (``compare.reference_embeddings``: why, in compare.py)."""
    from omni_train.data.tokenizer import load_tokenizer
    from omni_train.hf import compare

    cfg = released["cfg"]
    tok = load_tokenizer(cfg.data.tokenizer)
    prompts = compare.samples_from_jsonl(
        released["jsonl"], released["jsonl"].parent, cfg, prompts=True
    )
    answers = {}
    for p in prompts:
        ids, path = compare.reference_generate(
            released["ref"], p, cfg.model, NEW_TOKENS, tok.specials.im_end, tok.specials.pad
        )
        answers[p.name] = {"tokens": ids, "prompt_tokens": int(p.tokens.shape[0]), "path": path}
    return answers


def generate_cli(released, out: Path, nproc: int, *overrides: str) -> dict[str, dict]:
    """``omni-train generate`` on the imported checkpoint over the parity set (all six rows in
    one batch); its answers by key."""
    proc = subprocess.run(
        [sys.executable, "-m", "omni_train.cli", "generate", str(released["imported"]),
         "--data", str(released["jsonl"]), "--media", str(released["jsonl"].parent),
         "--out", str(out), "--max-new-tokens", str(NEW_TOKENS), "--batch-size", "6",
         "--nproc-per-node", str(nproc), "model=hf", f"model.hf_path={released['ref_dir']}",
         *hf_reference.TINY_DATA, "trainer.precision=fp32", "trainer.seq_length=1024",
         *overrides],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {r["key"]: r for r in map(json.loads, out.read_text().splitlines())}


@pytest.mark.parametrize("nproc", [1, 2], ids=["one_process", "tp2"])
def test_generate_greedy_equals_transformers_every_modality(
    released, reference_answers, tmp_path, nproc
):
    """The CLI end to end (answers.jsonl, one line per row) and its greedy tokens equal
    transformers' ``generate`` on every modality: text, image, images, video, audio, audio in
    video; at 1 process and TP 2 (sequence parallel switched off by generate)."""
    layout = "parallel=tp2" if nproc == 2 else "parallel=single"
    ours = generate_cli(released, tmp_path / "answers.jsonl", nproc, layout)
    assert list(ours) == list(reference_answers)  # one line per row, in order
    paths = {k: r["path"] for k, r in reference_answers.items()}
    assert paths["image"] == paths["images"] == "forward" == paths["text"]
    assert paths["audio_video"] == paths["audio_35s"] == "components"
    for key, want in reference_answers.items():
        got = ours[key]
        assert "error" not in got, got
        assert got["prompt_tokens"] == want["prompt_tokens"], key
        assert got["tokens"] == want["tokens"], (key, got["tokens"], want["tokens"])
        assert got["answer"]  # the reference answer: the conversation's last assistant turn
        assert isinstance(got["text"], str)


def test_the_options_matter(released):
    """With megatron-core's behaviour instead of the release's, parity breaks: the tests above
    would catch a regression of either option."""
    from omni_train.checkpoint.io import load_weights
    from omni_train.hf import compare
    from omni_train.hf.convert import _job, model_from_section, resolve_checkpoint
    from omni_train.model.assembly import build_model
    from omni_train.parallel.state import local_world
    from omni_train.platform import setup

    path, section, _ = resolve_checkpoint(released["imported"])
    worst = {}
    for option in ("model.vision.cpe_align_corners=true", "model.mamba_dt_clamp_min=0"):
        cfg = _job(model_from_section(section, [option]), [], "fp32")
        platform = setup()
        with local_world(cfg.parallel, platform, 0) as ps:
            model = build_model(cfg, ps, platform).module
            load_weights(path, model)
            model.eval()
            worst[option] = max(
                (compare.our_logits(model, s) - ref).abs().max().item() / ref.abs().max().item()
                for s, ref in zip(released["samples"], released["logits"], strict=True)
            )
    assert worst["model.vision.cpe_align_corners=true"] > 1e-2
    assert worst["model.mamba_dt_clamp_min=0"] > TOL


def test_export_is_bit_identical_and_loads_in_transformers(released, tmp_path):
    from transformers import AutoModelForImageTextToText

    from omni_train.data.tokenizer import TINY_DIR

    out = tmp_path / "exported"
    cli(
        "export-hf",
        str(released["imported"]),
        "--out",
        str(out),
        "--copy-processor-from",
        str(TINY_DIR),
    )
    source = load_file(released["ref_dir"] / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    # C-RADIO's LayerScale factors are ones, which omni-train's ViT does not have; transformers
    # lists them as optional (_keys_to_ignore_on_load_missing) and keeps them at 1
    assert set(source) - set(exported) == {k for k in source if "layer_scale" in k}
    assert set(exported) <= set(source)
    for key, value in exported.items():
        assert value.dtype == source[key].dtype and torch.equal(value, source[key]), key
    assert (out / "tokenizer.json").is_file()
    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "NemotronH_Omni_Reasoning_V3"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ref = hf_reference.omni()
    for key, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.slow  # a second copy: TP2 import (logits test), resharding (test_stages' handoff)
def test_export_from_a_tp2_training_run_after_import(released, synth_root, tmp_path):
    """A training step after import (TP=2 + SP, packed omni data, starting from the imported
    checkpoint), then export of that run; the exported model loads in transformers."""
    from transformers import AutoModelForImageTextToText

    run = tmp_path / "run"
    manifest = launch_stage(
        2,
        run,
        "stage=smoke_omni",
        "model=hf",
        f"model.hf_path={released['ref_dir']}",
        *hf_reference.TINY_DATA,
        "parallel=tp2",
        "trainer.precision=fp32",
        f"data.synthetic_root={synth_root}",
        f"checkpoint.init_from={released['imported']}",
        "trainer.train_steps=1",
        "trainer.eval_iters=1",
        "trainer.eval_at_start=true",
    )
    assert manifest["status"] == "completed" and manifest["step"] == 1
    assert manifest["eval_loss_at_start"] < 7.0  # the imported weights, not a crash
    out = tmp_path / "exported"
    cli("export-hf", str(run), "--out", str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["image_token_id"] == 10 and config["text_config"]["vocab_size"] == 512
    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    trained = model.state_dict()["language_model.lm_head.weight"]
    before = hf_reference.omni().state_dict()["language_model.lm_head.weight"]
    assert not torch.equal(trained, before)


EVERY_GROUP = ("peft.targets=[lm_attention,lm_mamba,lm_experts,lm_shared_expert,lm_mlp,"
               "vision_blocks,audio_blocks,projectors]")  # fmt: skip
LORA = ["peft=lora", EVERY_GROUP, "peft.rank=4", "stage.trainable=[llm,vision_encoder,"
        "vision_projector,audio_encoder,audio_projector]"]  # fmt: skip


def test_lora_exports_equal_ours_with_live_adapters_every_modality(released, synth_root, tmp_path):
    """A LoRA stage on every component (TP 2 + SP, from the import) -> export-hf --merge and
    export-hf + PEFT folder: transformers' reference with peft's adapter, the merged export and
    omni-train with live adapters (1 process and TP 2 + SP) give the same logits on every
    modality; the adapters changed them."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    from omni_train.hf import compare

    run = tmp_path / "lora"
    launch_stage(2, run, "stage=smoke_omni", "model=hf", f"model.hf_path={released['ref_dir']}",
                 *hf_reference.TINY_DATA, "parallel=tp2", "trainer.precision=fp32",
                 f"data.synthetic_root={synth_root}", "trainer.train_steps=2",
                 f"checkpoint.init_from={released['imported']}", "trainer.eval_iters=1",
                 "optimizer.lr=2e-2", *LORA)  # fmt: skip
    merged, plain = tmp_path / "merged", tmp_path / "plain"
    cli("export-hf", str(run), "--out", str(merged), "--merge")
    cli("export-hf", str(run), "--out", str(plain))
    adapter = load_file(plain / "adapter" / "adapter_model.safetensors")
    with_peft = PeftModel.from_pretrained(compare.load_reference(plain), plain / "adapter")
    loaded = get_peft_model_state_dict(with_peft)
    assert sorted(loaded) == sorted(adapter)  # every adapter landed on a module of theirs
    assert all(torch.equal(loaded[k], adapter[k]) for k in adapter)
    assert any(".experts.base_layer.lora_A" in k for k in adapter)  # both expert projections
    reference = with_peft.get_base_model()
    merged_ref = compare.load_reference(merged)
    cfg = released["cfg"]
    ours = {}
    for nproc, layout in ((1, "parallel=single"), (2, "parallel=tp2")):
        out = tmp_path / f"logits_{nproc}.pt"
        torchrun(nproc, str(Path(__file__).with_name("hf_probe.py")), str(run),
                 str(released["jsonl"]), str(released["jsonl"].parent), str(out), layout,
                 *LORA)  # fmt: skip
        ours[nproc] = torch.load(out)
    for i, (sample, base) in enumerate(zip(released["samples"], released["logits"], strict=True)):
        ref = compare.reference_logits(reference, sample, cfg.model)[0]
        scale = ref.abs().max().item()
        assert (ref - base).abs().max().item() / scale > 1e-3, sample.name  # adapters matter
        rel = (compare.reference_logits(merged_ref, sample, cfg.model)[0] - ref).abs().max()
        assert rel.item() / scale < TOL, f"merged export {sample.name}: {rel.item() / scale:.2e}"
        for nproc, logits in ours.items():
            rel = (logits[i] - ref).abs().max().item() / scale
            assert rel < TOL, f"ours ({nproc} processes) {sample.name}: {rel:.2e}"
    # the PEFT folder back: the same adapters, bit for bit, and exported again the same file
    back, again = tmp_path / "back", tmp_path / "again"
    cli("import-hf", str(plain / "adapter"), "--base", str(released["imported"]),
        "--out", str(back))  # fmt: skip
    last = json.loads((run / "manifest.json").read_text())["checkpoint"]
    trained = {k: v for k, v in plain_tensors(Path(last)).items() if ".lora." in k}
    imported = plain_tensors(back)
    assert sorted(imported) == sorted(trained) and differing(imported, trained) == []
    cli("export-hf", str(back), "--out", str(again))
    exported_again = load_file(again / "adapter" / "adapter_model.safetensors")
    assert sorted(exported_again) == sorted(adapter)
    assert differing(exported_again, adapter) == []
    # omni-train's own load of the LoRA run merges the adapters: compare-hf against --merge
    proc = cli("compare-hf", str(merged), str(run), "--data", str(released["jsonl"]),
               "--media", str(released["jsonl"].parent), "--json")  # fmt: skip
    rows = json.loads(proc.stdout[proc.stdout.index("[") :])
    assert len(rows) == 6 and all(r["rel_diff"] < TOL for r in rows), rows


def test_current_transformers_names_import_identically(released, tmp_path):
    """A checkpoint saved under transformers' in-memory names (merged experts, split RADIO
    q/k/v, audio_tower., ...) gives the same torch_dist tensors as the released names."""
    current = tmp_path / "current"
    current.mkdir()
    ref = hf_reference.omni()
    tensors = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(tensors, current / "model.safetensors")
    shutil.copy(released["ref_dir"] / "config.json", current / "config.json")
    out = tmp_path / "imported"
    convert(current, out, *hf_reference.TINY_DATA)
    a, b = plain_tensors(released["imported"]), plain_tensors(out)
    assert sorted(a) == sorted(b) and len(a) > 100
    assert differing(a, b) == []


def test_sharded_bf16_import_and_export(released, tmp_path):
    """Sharded safetensors with an index, in bf16: import keeps bf16, export shards again."""
    from omni_train.hf.safetensors_io import INDEX, SafetensorsReader

    sharded = tmp_path / "sharded"
    hf_reference.omni().to(torch.bfloat16).save_pretrained(sharded, max_shard_size="300KB")
    assert (sharded / INDEX).is_file()
    imported = tmp_path / "imported"
    convert(sharded, imported, *hf_reference.TINY_DATA)
    out = tmp_path / "exported"
    from omni_train.hf.export import export_hf

    report = export_hf(imported, out, max_shard_bytes=300_000)
    assert len(report.files) > 1 and (out / INDEX).is_file()
    a, b = SafetensorsReader(sharded), SafetensorsReader(out)
    for key in b.keys():  # noqa: SIM118 (a reader, not a dict)
        mine, theirs = b.get(key), a.get(key)
        # megatron keeps the router's expert bias in fp32 (so does transformers on load)
        want = torch.float32 if key.endswith("e_score_correction_bias") else theirs.dtype
        assert mine.dtype == want, key
        assert torch.equal(mine, theirs.to(want)), key


# ---- components for stage 0 -----------------------------------------------------------------


def test_component_imports_equal_the_whole_models_parts(released, tmp_path):
    ref = hf_reference.omni()
    parts = {
        "llm": ref.language_model,
        "vision_encoder": ref.vision_model,
        "audio_encoder": ref.audio_tower,
    }
    for component, module in parts.items():
        src = tmp_path / component
        module.save_pretrained(src)
        out = tmp_path / f"{component}_ckpt"
        convert(src, out, "model=tiny")
        manifest = json.loads((out / "omni_train_import.json").read_text())
        assert manifest["components"] == [component]
        mine = plain_tensors(out)
        assert len(mine) > 3 and all(k.startswith(component) for k in mine)
        assert differing(plain_tensors(released["imported"]), mine) == [], component


def test_image_only_radio_gets_an_inflated_video_embedder(tmp_path):
    src = hf_reference.save(tmp_path / "radio", part="radio")
    out = tmp_path / "vision"
    report = convert(src, out, "model=tiny")
    assert any("inflated" in note for note in report.notes)
    t = plain_tensors(out)
    image, video = t["vision_encoder.embedder.weight"], t["vision_encoder.video_embedder.weight"]
    assert torch.equal(video, image.repeat(1, 2) / 2)
    assert torch.equal(
        image,
        load_file(src / "model.safetensors")["radio_model.model.patch_generator.embedder.weight"],
    )


def test_components_check_their_fit(released, tmp_path):
    from omni_train.config import compose_job
    from omni_train.stage.handoff import check_components, check_handoff

    ref = hf_reference.omni()
    src = tmp_path / "lm"
    ref.language_model.save_pretrained(src)
    out = tmp_path / "llm"
    convert(src, out, "model=tiny")
    ok = compose_job(["model=tiny", f"+checkpoint.init_components.llm={out}"])
    assert check_components(ok) == {"llm": out}
    wrong_name = compose_job(["model=tiny", f"+checkpoint.init_components.audio_encoder={out}"])
    with pytest.raises(ValueError, match="holds \\['llm'\\]"):
        check_components(wrong_name)
    other = compose_job(
        ["model=tiny", "model.mamba_dt_clamp_min=0", f"+checkpoint.init_components.llm={out}"]
    )
    with pytest.raises(ValueError, match="mamba_dt_clamp_min"):
        check_components(other)
    # the whole imported model starts any stage of the same model; another model is refused
    same = compose_job(
        [
            "model=hf",
            f"model.hf_path={released['ref_dir']}",
            f"checkpoint.init_from={released['imported']}",
        ]
    )
    assert check_handoff(same) == released["imported"]
    tiny = compose_job(["model=tiny", f"checkpoint.init_from={released['imported']}"])
    assert check_handoff(tiny) == released["imported"]  # the same architecture
    no_audio = compose_job(
        ["model=tiny", "model.audio=null", f"checkpoint.init_from={released['imported']}"]
    )
    with pytest.raises(ValueError, match="components"):
        check_handoff(no_audio)


def test_nemo_parakeet_imports_through_nemos_restore(tmp_path):
    """A .nemo (a NeMo CTC model with the tiny FastConformer, written by NeMo's save_to) ->
    audio_encoder through NeMo's own restore_from: every encoder tensor, BatchNorm statistics
    included, lands unchanged."""
    nemo = tmp_path / "tiny.nemo"
    probe = Path(__file__).with_name("nemo_probe.py")
    subprocess.run([sys.executable, str(probe), str(nemo)], check=True, timeout=600)
    out = tmp_path / "audio"
    convert(nemo, out, "model=tiny")
    manifest = json.loads((out / "omni_train_import.json").read_text())
    assert manifest["components"] == ["audio_encoder"]
    assert manifest["source_kind"] == "audio_encoder"
    source = torch.load(nemo.with_suffix(".pt"))
    imported = plain_tensors(out)
    assert sorted(imported) == sorted(f"audio_encoder.encoder.{k}" for k in source)
    for key, value in source.items():
        assert torch.equal(imported[f"audio_encoder.encoder.{key}"], value), key


# ---- refusals --------------------------------------------------------------------------------


def _error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return proc.stderr


def test_refusals(released, tmp_path):
    ref_dir = released["ref_dir"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("precious")
    assert "not empty" in _error(import_hf(ref_dir, busy, ok=False))
    assert (busy / "keep.txt").read_text() == "precious"

    def refused(src: Path, out: str, *overrides: str) -> str:
        with pytest.raises(ValueError) as e:
            convert(src, tmp_path / out, *overrides)
        return str(e.value)

    mtp = tmp_path / "mtp"
    shutil.copytree(ref_dir, mtp)
    config = json.loads((mtp / "config.json").read_text())
    config["text_config"]["num_nextn_predict_layers"] = 1
    (mtp / "config.json").write_text(json.dumps(config))
    assert "multi-token-prediction" in refused(mtp, "o1")

    extra = tmp_path / "extra"
    shutil.copytree(ref_dir, extra)
    tensors = load_file(extra / "model.safetensors")
    tensors["language_model.backbone.layers.0.mixer.surprise.weight"] = torch.zeros(2)
    save_file(tensors, extra / "model.safetensors")
    assert "no place in omni-train" in refused(extra, "o2")

    scaled = tmp_path / "scaled"
    shutil.copytree(ref_dir, scaled)
    tensors = load_file(scaled / "model.safetensors")
    tensors["vision_model.radio_model.model.blocks.0.layer_scale1.lambda1"] *= 2
    save_file(tensors, scaled / "model.safetensors")
    assert "LayerScale" in refused(scaled, "o3")

    radio = hf_reference.save(tmp_path / "radio", part="radio")
    assert "name the model" in refused(radio, "o4")
    assert "hidden_size" in refused(radio, "o5", "model=tiny", "model.vision.hidden_size=64")
    for folder in ("o1", "o2", "o3", "o4", "o5"):
        assert not (tmp_path / folder).exists()  # nothing half-written


def test_lm_alone_round_trip(tmp_path):
    """The LM alone (nemotron_h): model=hf gives an LM-only model; its export is the source,
    bit for bit, as a NemotronHForCausalLM checkpoint."""
    from omni_train.hf.export import export_hf

    src = tmp_path / "lm"
    hf_reference.omni().language_model.save_pretrained(src)
    imported = tmp_path / "imported"
    report = convert(src, imported)
    assert report.components == ["llm"]
    out = tmp_path / "exported"
    export_hf(imported, out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["NemotronHForCausalLM"]
    source, exported = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(source) == sorted(exported)
    assert all(torch.equal(source[k], exported[k]) for k in source)
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "NemotronHForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
