"""``omni-train generate`` (omni_train.inference): the cache against recomputing the prefix,
batching, sampling against transformers' warpers, the prompt, the refusals.

The comparison with transformers' ``generate`` on the released model (every modality, 1
process and TP 2, through the CLI) is in tests/test_hf_checkpoint.py, which owns that fixture.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omni_train.inference.sampling import SamplingConfig, generator, sample, top_p_filter
from omni_train.stage.launch import torchrun

PROBE = Path(__file__).with_name("generate_probe.py")


@pytest.mark.parametrize("nproc", [1, 2], ids=["one_process", "tp2"])
def test_cache_equals_recompute_and_batching_changes_nothing(tmp_path, nproc):
    """Greedy with megatron's cache (per-row prefill, merged cache, batched decode) equals
    recomputing the whole prefix each token, on a batch of text, image, video + audio and audio
    rows of different lengths; a batch of one gives the same tokens as the batch of four;
    sampling is reproducible per seed; every rank generates the same tokens."""
    overrides = ["parallel=tp2"] if nproc == 2 else []
    torchrun(nproc, str(PROBE), str(tmp_path), *overrides, timeout=900)
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["prompt_lengths"] == [23, 15, 38, 30]
    assert all(len(row) == 10 for row in r["cached"])
    assert r["cached"] == r["recomputed"]
    assert r["cached"] == r["one_by_one"]
    assert r["sampled"][0] == r["sampled"][1]  # same seed, same tokens
    assert r["sampled"][0] != r["sampled_other_seed"]
    assert r["sampled"][0] != r["cached"]
    assert r["ranks_agree"]
    # megatron-core 0.16.1 internals the merge relies on: MambaMixer.cached_batch_size (else
    # its state cache re-zeros the merged states) and one mixer per Mamba layer
    assert r["mamba_mixers"] >= 1 and r["cached_batch_size"] == [4]


def test_top_p_equals_transformers_warper():
    from transformers.generation.logits_process import TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    for p in (0.05, 0.5, 0.9, 0.999):
        logits = torch.randn(8, 300, generator=g) * 3
        want = TopPLogitsWarper(p)(None, logits.clone())
        got = top_p_filter(logits, p)
        assert torch.equal(torch.isinf(got), torch.isinf(want)), p
        assert torch.equal(got[~torch.isinf(got)], want[~torch.isinf(want)])
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_sampling_is_seeded_and_filters():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    cfg = SamplingConfig(temperature=0.8, top_k=5, top_p=0.9, seed=11)
    a = [sample(logits, cfg, g) for g in [generator(cfg)] for _ in range(20)]
    b = [sample(logits, cfg, g) for g in [generator(cfg)] for _ in range(20)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    allowed = torch.topk(logits, 5).indices
    assert all(bool((allowed == x[:, None]).any(1).all()) for x in a)  # top-k holds
    assert torch.equal(sample(logits, SamplingConfig(), generator(cfg)), logits.argmax(-1))
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0.0)


def test_encode_prompt_cuts_before_the_last_assistant_turn():
    from omni_train.config.data import TokenizerConfig
    from omni_train.data.prompts import encode_prompt
    from omni_train.data.task_encoder import OmniTaskEncoder, cook_raw

    enc = OmniTaskEncoder(
        tokenizer=TokenizerConfig(), vision=None, audio=None, context_length=64, training=False
    )
    turns = [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Colour?"},
        {"role": "assistant", "content": "Red."},
    ]
    raw = lambda t: cook_raw("k", {"json": json.dumps({"conversation": t}).encode()})  # noqa: E731
    s, answer = encode_prompt(enc, raw(turns))
    text = enc.tok.hf.decode(s.tokens.tolist())
    assert answer == "Red."
    assert text.endswith("Colour?<|im_end|>\n<|im_start|>assistant\n") and "Hello." in text
    alone, none = encode_prompt(enc, raw(turns[:1]))  # no assistant turn: all of it
    assert none is None and enc.tok.hf.decode(alone.tokens.tolist()).endswith("assistant\n")
    from omni_train.data.conversation import SampleError

    with pytest.raises(SampleError, match="too_long"):
        encode_prompt(enc, raw([{"role": "user", "content": "word " * 100}]))


def test_cli_refuses_context_parallel_before_starting(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "omni_train.cli", "generate", str(tmp_path), "--data", "x.jsonl",
         "--media", str(tmp_path), "--out", str(tmp_path / "a.jsonl"), "model=tiny",
         "parallel=cp2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "without context and pipeline parallelism" in proc.stderr


def test_model_fingerprint_is_checked_against_the_manifest(tmp_path):
    from omni_train.checkpoint import check_model_fingerprint, write_manifest

    check_model_fingerprint(tmp_path, "abc")  # no manifest (an imported checkpoint): nothing
    write_manifest(tmp_path, {"model_fingerprint": "abc"})
    check_model_fingerprint(tmp_path / "checkpoints" / "step_1", "abc")
    with pytest.raises(ValueError, match="another model config"):
        check_model_fingerprint(tmp_path, "xyz")


def test_a_checkpoint_of_another_model_ends_the_tool_with_one_line(tmp_path):
    """A ValueError inside the tool's ranks (here: the checkpoint was trained for another
    model) is said in one line first, exit status 2, no traceback of the front door."""
    (tmp_path / "manifest.json").write_text(json.dumps({"model_fingerprint": "another"}))
    proc = subprocess.run(
        [sys.executable, "-m", "omni_train.cli", "eval", str(tmp_path), "--data", "x.jsonl",
         "model=tiny"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    first = proc.stderr.strip().splitlines()[0]
    assert first.startswith("omni-train eval: error: ") and "another model config" in first
    assert "omni_train/cli.py" not in proc.stderr  # the front door adds no traceback
