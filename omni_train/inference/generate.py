"""``omni-train generate``: answers of a trained checkpoint for every row of a JSONL file.

    omni-train generate CKPT --data FILE.jsonl --media DIR --out answers.jsonl
        [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S]
        [--batch-size B] [--nproc-per-node N] [overrides: parallel=tp2 ...]

Each row (``omni-train data convert`` format, media under DIR) becomes a prompt: the
conversation up to its last assistant turn, ending with the chat template's opening of an
assistant reply (:mod:`omni_train.data.prompts`); that turn's text is kept as the reference
answer. Every row is answered until it emits the end-of-turn token (``<|im_end|>``) or reaches
``--max-new-tokens``: greedy by default, sampled with ``--temperature`` (then ``--top-k`` /
``--top-p``, transformers' semantics; :mod:`.sampling`).

What megatron-core provides and what is written here:

- megatron-core's static inference machinery does the caching: ``StaticInferenceContext``, the
  attention key/value cache in ``Attention`` and the Mamba conv/SSM state cache with the
  single-token ``MambaMixer._decode``, so each new token costs one token's forward. Its text
  generation controllers and engines are not used: they are CUDA-bound, carry no media and
  step through the longer prompts of a batch one token at a time.
- written here: the loop (per-row prefill with media, cache merge, batched decode, stop),
  sampling, the prompt, the CPU scan kernel of the prefill (``platform.kernels.mamba``).

Batches of ``--batch-size`` rows: every row is prefilled alone, then the batch decodes
together (:mod:`.cache`); a finished row keeps decoding (masked) until the whole batch is done.
The output (rank 0 writes it) holds one JSON line per input row: ``key``, ``prompt_tokens``,
``tokens`` (the generated ids, the stop token included), ``text`` (decoded, without the stop
token), ``stopped`` (the stop token was reached), ``answer`` (the reference, or null); a row
that cannot be encoded gets ``error`` instead (a prompt longer than ``trainer.seq_length`` is
one: raise it with ``trainer.seq_length=N``).

Layouts: any TP / EP the checkpoint can be loaded into (its weights are resharded on load).
Every rank reads and processes **the same rows in lockstep**: the MoE layers are collectives
over the expert-parallel group and the TP layers over the TP group, so all ranks must run the
same forwards; sampling draws from a generator seeded identically everywhere, on the full
vocabulary's logits, so the ranks pick the same tokens. Sequence parallel is switched off (a
decode step has one token per row, and megatron's static Mamba path asserts it off); context
and pipeline parallel are refused. On a GPU with Transformer Engine attention the padding mask
of a merged batch has not been verified: use ``--batch-size 1`` there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from omni_train import platform as omni_platform
from omni_train.checkpoint import check_model_fingerprint
from omni_train.checkpoint.io import load_weights
from omni_train.config import JobConfig, compose_job, config_hash
from omni_train.data.conversation import SampleError
from omni_train.data.loader import task_encoder
from omni_train.data.media import Media
from omni_train.data.prompts import encode_prompt
from omni_train.data.task_encoder import OmniSample, cook_raw
from omni_train.datatools.convert import ConvertError, sample_from_line
from omni_train.inference.cache import key_padding_mask, merge_rows, prefill_row
from omni_train.inference.layout import generation_parallel
from omni_train.inference.sampling import SamplingConfig, generator, sample
from omni_train.log import install_filters
from omni_train.model.assembly import build_model
from omni_train.parallel import destroy_parallel, init_parallel


def prompt_media(s: OmniSample, key: str) -> Media:
    """The media of one encoded prompt as a batch of one row."""
    return Media(
        images=s.images,
        image_sample=[0] * len(s.images),
        videos=s.videos,
        video_sample=[0] * len(s.videos),
        audio=s.audio,
        audio_sample=[0] * len(s.audio),
        sample_names=[key],
        vision_kinds=s.vision_kinds,
    )


def _finish(tokens: list[int], cfg: SamplingConfig) -> list[int]:
    """A row's tokens up to and including its first stop token."""
    for i, t in enumerate(tokens):
        if t in cfg.stop_ids:
            return tokens[: i + 1]
    return tokens


@torch.no_grad()
def generate_batch(
    model,
    prompts: list[torch.Tensor],
    media: list[Media | None],
    cfg: SamplingConfig,
    gen: torch.Generator,
) -> list[list[int]]:
    """The generated ids of every prompt (``[P_i]`` int64 each, with its media; ``model``: an
    ``OmniModel`` in eval mode), each up to its first stop token or ``cfg.max_new_tokens``.

    Per-row prefill, merged cache, one batched single-token decode step per new token; a row
    that has stopped is fed its stop token until all have (its output ends at the stop)."""
    device = next(model.parameters()).device
    lengths = [int(p.shape[0]) for p in prompts]
    max_length = max(lengths) + cfg.max_new_tokens
    rows, first = [], []
    for ids, m in zip(prompts, media, strict=True):
        ctx, logits = prefill_row(model, ids[None].to(device), m, max_length)
        rows.append(ctx)
        first.append(logits)
    ctx = merge_rows(model, rows, lengths, max_length)
    del rows
    stop = torch.tensor(cfg.stop_ids or (-1,), device=device)
    nxt = sample(torch.cat(first), cfg, gen)  # [b]
    out = [nxt]
    done = torch.isin(nxt, stop)
    for _ in range(1, cfg.max_new_tokens):
        if bool(done.all()):
            break
        mask = key_padding_mask(lengths, ctx, device)
        logits = model.generate_step(nxt[:, None], None, ctx, mask)
        ctx.increment_sequence_len_offset(1)
        nxt = torch.where(done, stop[0], sample(logits, cfg, gen))
        out.append(nxt)
        done |= torch.isin(nxt, stop)
    tokens = torch.stack(out, dim=1).tolist()  # [b, new]
    return [_finish(row, cfg) for row in tokens]


@torch.no_grad()
def generate_no_cache(
    model,
    prompts: list[torch.Tensor],
    media: list[Media | None],
    cfg: SamplingConfig,
    gen: torch.Generator,
) -> list[list[int]]:
    """:func:`generate_batch` without a cache (the benchmark's baseline and the tests'
    reference): one row at a time, every new token recomputes the LM over the whole prefix.
    The prompt's embeddings (its media encoded) are made once per row, so only the LM's
    recomputation differs from the cached path. Rows are sampled one after another, so a
    sampled (non-greedy) run draws another stream than :func:`generate_batch`."""
    device = next(model.parameters()).device
    answers = []
    for ids, m in zip(prompts, media, strict=True):
        emb = model.embed(ids[None].to(device), m, None)  # [P, 1, h]
        row: list[int] = []
        for _ in range(cfg.max_new_tokens):
            logits = model.generate_step(None, None, None, decoder_input=emb)
            nxt = sample(logits, cfg, gen)
            row.append(int(nxt[0]))
            if row[-1] in cfg.stop_ids:
                break
            emb = torch.cat([emb, model.embed_generated(nxt[:, None])])
        answers.append(row)
    return answers


def generation_config(overrides: list[str]) -> JobConfig:
    """The stage's config (its overrides) as generation builds it (:func:`generation_view`)."""
    return generation_view(compose_job(overrides))


def generation_view(cfg: JobConfig) -> JobConfig:
    """``cfg`` as generation runs it: sequence parallel off, unpacked rows, no loader workers.
    Context or pipeline parallel is refused (megatron's static Mamba decode asserts no CP; the
    loop runs the whole model in each process)."""
    parallel = generation_parallel(cfg.parallel)
    data = dataclasses.replace(
        cfg.data, packing=dataclasses.replace(cfg.data.packing, enabled=False), num_workers=0
    )
    return dataclasses.replace(cfg, parallel=parallel, data=data)


def iter_jsonl(path: str | Path, media_root: str | Path) -> Iterator[tuple[str, object, dict]]:
    """(key, a cooked conversation or the ConvertError, the row's JSON object or {}) per
    non-empty JSONL line."""
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = sample_from_line(line, Path(media_root), f"line_{lineno}")
        except ConvertError as e:
            yield f"line_{lineno}", e, {}
            continue
        row = json.loads(line)
        yield raw.key, cook_raw(raw.key, raw.tar_members()), row


def read_rows(path: str | Path, media_root: str | Path) -> list[tuple[str, object]]:
    """(key, a cooked conversation or the error string) per non-empty JSONL line."""
    return [
        (key, f"{conv}" if isinstance(conv, ConvertError) else conv)
        for key, conv, _ in iter_jsonl(path, media_root)
    ]


def answer_rows(
    model,
    cfg: JobConfig,
    rows: list[tuple[str, object]],
    sampling: SamplingConfig,
    batch_size: int,
    device: torch.device,
) -> list[dict]:
    """One record per row (module docstring), generated in batches of ``batch_size``."""
    encoder = task_encoder(cfg, training=False)
    if not sampling.stop_ids:  # the chat template's end of turn
        sampling = dataclasses.replace(sampling, stop_ids=(encoder.tok.specials.im_end,))
    gen = generator(sampling)
    records: list[dict] = []
    todo: list[tuple[dict, torch.Tensor, Media]] = []

    def flush() -> None:
        if not todo:
            return
        media = [m.to(device) for _, _, m in todo]
        outs = generate_batch(model, [ids for _, ids, _ in todo], media, sampling, gen)
        for (rec, _, _), toks in zip(todo, outs, strict=True):
            stopped = bool(toks) and toks[-1] in sampling.stop_ids
            text_ids = toks[:-1] if stopped else toks
            rec.update(tokens=toks, text=encoder.tok.hf.decode(text_ids), stopped=stopped)
        todo.clear()

    for key, conv in rows:
        rec: dict = {"key": key}
        records.append(rec)
        if isinstance(conv, str):
            rec["error"] = conv
            continue
        try:
            s, answer = encode_prompt(encoder, conv)
        except SampleError as e:
            rec["error"] = str(e)  # "reason: message"
            continue
        rec.update(prompt_tokens=int(s.tokens.shape[0]), answer=answer)
        todo.append((rec, s.tokens, prompt_media(s, key)))
        if len(todo) == batch_size:
            flush()
    flush()
    return records


def run(
    checkpoint: str | Path,
    data: str | Path,
    media_root: str | Path,
    out: str | Path,
    overrides: list[str],
    sampling: SamplingConfig,
    batch_size: int = 8,
) -> list[dict]:
    """Build the model of ``overrides`` (checked against the checkpoint's manifest), load the
    weights of ``checkpoint`` (a stage folder or one checkpoint, any layout), answer every row
    of ``data`` and write ``out`` (rank 0). Returns the records."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    cfg = generation_config(overrides)
    check_model_fingerprint(checkpoint, config_hash(cfg, sections=("model",)))
    rows = read_rows(data, media_root)
    with loaded_model(cfg, checkpoint) as (model, ps, device):
        records = answer_rows(model, cfg, rows, sampling, batch_size, device)
        if ps.is_main:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text("".join(json.dumps(r) + "\n" for r in records))
        return records


@contextlib.contextmanager
def loaded_model(cfg: JobConfig, checkpoint: str | Path):
    """(the ``OmniModel`` of ``cfg`` in eval mode with ``checkpoint``'s weights, resharded to
    this layout; the parallel state; the device), in a process group torn down on exit."""
    platform = omni_platform.setup()
    ps = init_parallel(cfg.parallel, platform, cfg.trainer.seed)
    try:
        model = build_model(cfg, ps, platform).module
        load_weights(checkpoint, model)
        yield model.eval(), ps, platform.device
    finally:
        destroy_parallel()


def main(argv: list[str] | None = None) -> int:
    install_filters()  # an entry point: see omni_train.log.QUIET
    parser = argparse.ArgumentParser(prog="omni-train generate", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a stage's output folder or one of its checkpoints")
    parser.add_argument("--data", required=True, help="a JSONL file (data convert format)")
    parser.add_argument("--media", required=True, help="the folder its media paths are under")
    parser.add_argument("--out", required=True, help="answers.jsonl to write")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    args, overrides = parser.parse_known_args(argv)
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    records = run(
        args.checkpoint, args.data, args.media, args.out, overrides, sampling, args.batch_size
    )
    failed = sum("error" in r for r in records)
    print(f"{len(records)} rows answered ({failed} could not be encoded) -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
