"""How much of the sound reaches the tiny audio encoder's tokens? (CPU, ~1 min)

    .venv/bin/python benchmarks/audio_signal.py [--checkpoint RUN_OR_CHECKPOINT ...]
        [--out benchmarks/results/learning_explore/audio_init/signal.md]

Feeds the learnability tasks' tones (``audio_pitch``: four notes; ``audio_video_order``: a low
and a high tone in either order; 32 held-out-style clips each, drawn with seed 5) through the
tiny model's audio encoder and reports, after each stage (the normalised mel features, the
subsampling ``pre_encode``, each conformer layer):

- ``rms``: the root mean square of the stage's output;
- ``time``: its variation over a clip's frames (each clip's frames minus their mean), over
  ``rms``: how much of the output moves with the sound at all;
- ``class``: the spread of the per-answer mean frame over ``rms`` (the per-feature normalised
  mel features average to zero over a clip, so 0 there by construction; for the order task
  the answer lies in the order, not the mean, so it stays small even where the task is read).

Encoders compared: the tiny config built from seed 0 with NeMo's own subsampling init
(``init=False``) and with ours (:func:`omni_train.model.audio.init_subsampling`), then the audio
encoder of each ``--checkpoint`` (a stage folder or one checkpoint of ``stage=learn``, any
parallel layout). Off the runtime path: a diagnosis, not a training step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from omni_train.config import compose_job
from omni_train.data.loader import task_encoder
from omni_train.data.task_encoder import cook_raw
from omni_train.datatools.learn_tasks import TASKS, task_samples
from omni_train.datatools.prepare import RawSample
from omni_train.model.audio import AudioEncoder

STAGE = ["stage=learn", "model=tiny"]
AUDIO_TASKS = ("audio_pitch", "audio_video_order")


def clips_of(task: str, cfg, num: int = 32, seed: int = 5) -> tuple[list[torch.Tensor], list]:
    """The task's first ``num`` samples as the model reads them: (clips [n_i], answers)."""
    encoder = task_encoder(cfg, training=False)
    clips, answers = [], []
    for s in task_samples(task, num, seed):
        members = RawSample(s.key, s.conversation, s.members).tar_members()
        clips += encoder.encode(cook_raw(s.key, members, TASKS[task].category)).audio
        answers.append(s.truth["answer"])
    return clips, answers


def stage_outputs(model: AudioEncoder, clips: list[torch.Tensor]) -> dict[str, list]:
    """{stage: [frames_i, width] per clip}, valid frames only."""
    seen = {}
    nemo = model.encoder
    hooks = [nemo.pre_encode.register_forward_hook(lambda m, i, o: seen.update(pre_encode=o[0]))]
    for n, layer in enumerate(nemo.layers):
        hooks.append(
            layer.register_forward_hook(lambda m, i, o, n=n: seen.update({f"layer{n}": o}))
        )
    model.eval()
    with torch.no_grad():
        feats, lengths = model.features(clips)  # [clips, T, mels]
        tokens = [t.shape[0] for t in model(clips)]
    for h in hooks:
        h.remove()
    out = {"mel": [feats[k, : int(n)] for k, n in enumerate(lengths)]}
    for name, t in seen.items():
        out[name] = [t[k, :n] for k, n in enumerate(tokens)]
    return out


def spread(frames: list[torch.Tensor], answers: list) -> tuple[float, float, float]:
    """(rms, variation over time / rms, spread of the per-answer mean frame / rms)."""
    rms = torch.cat(frames).pow(2).mean().sqrt()
    over_time = torch.cat([f - f.mean(0) for f in frames]).pow(2).mean().sqrt()
    means = torch.stack([f.mean(0) for f in frames])
    by_answer = torch.stack(
        [means[[a == c for a in answers]].mean(0) for c in sorted(set(answers))]
    )
    between = by_answer.std(0).pow(2).mean().sqrt()
    return float(rms), float(over_time / rms), float(between / rms)


def checkpoint_encoders(paths: list[str]) -> dict[str, AudioEncoder]:
    """{path: the audio encoder of that ``stage=learn`` checkpoint}, each resharded to this
    one process (no launcher needed)."""
    import copy

    from omni_train import platform as omni_platform
    from omni_train.checkpoint.io import load_weights
    from omni_train.model.assembly import build_model
    from omni_train.parallel import destroy_parallel, init_parallel
    from omni_train.stage.probe import probe_config

    if not paths:
        return {}
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533")):  # fmt: skip
        os.environ.setdefault(key, value)
    cfg = probe_config(STAGE)
    platform = omni_platform.setup()
    ps = init_parallel(cfg.parallel, platform, cfg.trainer.seed)
    try:
        model = build_model(cfg, ps, platform).module
        out = {}
        for path in paths:
            load_weights(path, model)
            out[path] = copy.deepcopy(model.audio_encoder)
        return out
    finally:
        destroy_parallel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", default=[], help="repeatable")
    parser.add_argument("--out", type=Path, default=None, help="also write the table (and .json)")
    args = parser.parse_args()
    cfg = compose_job(STAGE)
    data = {task: clips_of(task, cfg) for task in AUDIO_TASKS}
    encoders = {}
    for name, init in (("nemo_init", False), ("our_init", True)):
        torch.manual_seed(0)
        encoders[name] = AudioEncoder(cfg.model.audio, init=init)
    encoders.update(checkpoint_encoders(args.checkpoint))
    record: dict[str, dict] = {}
    lines = ["| encoder | task | stage | rms | time / rms | class / rms |", "|---" * 6 + "|"]
    for name, model in encoders.items():
        for task, (clips, answers) in data.items():
            for stage, frames in stage_outputs(model, clips).items():
                rms, over_time, between = spread(frames, answers)
                record.setdefault(name, {}).setdefault(task, {})[stage] = {
                    "rms": rms,
                    "time": over_time,
                    "class": between,
                }
                lines.append(f"| {name} | {task} | {stage} | {rms:.3f} | {over_time:.3f} | "
                             f"{between:.3f} |")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python benchmarks/audio_signal.py", *sys.argv[1:]])
        args.out.write_text(f"# Audio encoder signal per stage\n\nCommand: `{command}`\n\n{text}\n")
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
