"""Checkpoint config: where a stage saves, how it resumes or starts from the previous stage."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CheckpointConfig:
    """Where the stage writes, and where it starts from.

    ``resume`` restores everything of an interrupted run of *this* stage from ``output_dir``
    (weights, optimizer, scheduler, RNG, data position, step). ``init_from`` starts a fresh run
    from another checkpoint's *weights only*. When both could apply, resume wins.
    """

    output_dir: str = "runs/${stage.name}"
    init_from: str | None = None
    # Stage 0's pretrained components: component name -> a torch_dist checkpoint holding that
    # component's weights under its own prefix (e.g. llm.*); every other component keeps its
    # initialisation. Importing the published HF/NeMo checkpoints into this form comes later.
    init_components: dict[str, str] = field(default_factory=dict)
    # Before init_from: the source must be the completed final checkpoint of stage.previous
    # with the same model fingerprint. false skips these checks (logged).
    check_handoff: bool = True
    # Resume from output_dir's newest *intact* checkpoint (omni_train.stage.resume):
    # "auto": if there is one; a damaged newer one is set aside with a warning;
    # "strict": there must be one and the newest checkpoint must be it (damaged: stop);
    # "true": there must be one; "false": never (a folder with checkpoints is refused).
    resume: str = "auto"
    # Start this stage over in a folder that holds a run (checkpoints, or a completed or
    # interrupted manifest): its checkpoints and manifest move to superseded-<time>/, never
    # deleted. Without it such a folder is resumed, or refused when nothing in it is intact.
    start_over: bool = False
    # A resume whose schedule settings (train steps, LR, warmup, decay, batch) differ from the
    # checkpoint's: "refuse" (say what changed and stop), "keep" (continue the checkpoint's
    # schedule), "rescale" (the new settings from the current step on).
    on_schedule_change: str = "refuse"
    # What the integrity record digests: the first and last 256 KiB of every file with its
    # size ("head_tail"), or every byte ("full": a resume check then reads the checkpoint).
    integrity: str = "head_tail"
    keep_last: int = 2  # older step checkpoints are deleted; 0 keeps all

    def __post_init__(self) -> None:
        if str(self.resume).lower() not in RESUME_MODES:
            raise ValueError(f"checkpoint.resume={self.resume!r}; valid: {', '.join(RESUME_MODES)}")
        self.resume = str(self.resume).lower()
        if self.on_schedule_change not in SCHEDULE_CHANGE:
            raise ValueError(
                f"checkpoint.on_schedule_change={self.on_schedule_change!r}; valid: "
                f"{', '.join(SCHEDULE_CHANGE)}"
            )
        if self.integrity not in ("head_tail", "full"):
            raise ValueError(f"checkpoint.integrity={self.integrity!r}; valid: head_tail, full")
        if self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last={self.keep_last} must be >= 0")
        if self.start_over and self.resume in ("true", "strict"):
            raise ValueError(
                f"checkpoint.start_over=true and checkpoint.resume={self.resume} contradict each "
                "other: start over (resume=auto) or resume (start_over=false)"
            )


RESUME_MODES = ("auto", "strict", "true", "false")
SCHEDULE_CHANGE = ("refuse", "keep", "rescale")
