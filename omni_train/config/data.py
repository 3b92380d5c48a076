"""Data config: blend, tokenizer, packing, data layout, media budgets."""

from __future__ import annotations

from dataclasses import dataclass, field

from omni_train.config.checks import positive


@dataclass
class TokenizerConfig:
    """A Hugging Face tokenizer folder and the spelling of the tokens the sample layout uses.

    Defaults are the released model's vocabulary (transformers 5.23 ``nemotron_h_omni``
    processor). Every name except ``video`` must be one token of the tokenizer (checked at
    start-up). ``video`` is only the text placeholder a video part renders as before the layout
    expands it: the release has no video token, its frames use the image placeholder.
    """

    path: str = "tiny"  # a local tokenizer folder, or "tiny": the test tokenizer omni-train ships
    im_start: str = "<|im_start|>"
    im_end: str = "<|im_end|>"  # the end-of-turn token: it carries loss after an assistant turn
    pad: str = "<pad>"
    # one placeholder per projected media feature; ids must equal model.media_tokens
    image: str = "<image>"
    video: str = "<video>"
    audio: str = "<so_embedding>"
    # markers around each placeholder run (video frame groups use the image markers)
    image_start: str = "<img>"
    image_end: str = "</img>"
    audio_start: str = "<so_start>"
    audio_end: str = "<so_end>"
    think_start: str = "<think>"
    think_end: str = "</think>"


@dataclass
class PackingConfig:
    """Online sequence packing (issue #5; docs/packing.md): samples become THD packed sequences
    of ``trainer.seq_length`` tokens, one per micro-batch (``trainer.micro_batch_size=1``;
    ``trainer.global_batch_size`` counts packed sequences).

    ``balance``: ``global`` (every data-parallel rank plans the same sample stream and packs the
    same bins, then keeps only the bins dealt to it, so the bins of one step cost the same on
    every rank; each sample is *decoded* once, by its rank, but every rank reads and plans
    every sample); ``local`` (each rank packs its own share of the stream, no cross-rank
    balance, no extra reading).
    """

    enabled: bool = False
    buffer_size: int = 1000  # samples planned ahead, per data worker (not decoded: small)
    # Planned samples (their media still encoded: bytes as read) kept in each data worker's
    # memory until their bin is decoded, so a bin's samples are not read and planned a second
    # time. Past the cap, and for the buffer a resumed stage restores, samples are fetched
    # again by their energon restore keys (the same sample, planned the same way). 0: always.
    plan_cache_mib: int = 256
    balance: str = "global"
    min_fill: float = 0.95  # a bin is emitted once this full; emptier ones wait for samples
    max_wait: int = 4  # repacks a sample may wait before its bin is emitted however full
    # Every sample is padded to a multiple of this many tokens. None: what the layout needs
    # (2 x cp, x tp under sequence parallel; 1 without CP). Set it to compare layouts on
    # identical bins (padding changes what fits), or to keep bins fixed across a CP change.
    sample_pad_multiple: int | None = None
    # Pad every packed sequence to exactly trainer.seq_length tokens (fixed shapes). Needed by
    # megatron's allgather MoE dispatcher under EP > 1: it gathers equal-sized token blocks from
    # ranks that hold different packed sequences. Costs the padding's compute.
    pad_to_capacity: bool = False
    # relative compute per sample (omni_train.data.packing.CostWeights; production defaults)
    attention_weight: float = 7.7e-6  # per token^2 of a sample
    vision_weight: float = 0.83  # per image/video token
    audio_weight: float = 0.19  # per audio token

    def __post_init__(self) -> None:
        if self.balance not in ("global", "local"):
            raise ValueError(f"data.packing.balance={self.balance!r}; valid: global, local")
        positive("data.packing", buffer_size=self.buffer_size, max_wait=self.max_wait)
        if self.plan_cache_mib < 0:
            raise ValueError(f"data.packing.plan_cache_mib={self.plan_cache_mib} must be >= 0")
        if self.sample_pad_multiple is not None:
            positive("data.packing", sample_pad_multiple=self.sample_pad_multiple)
        if not 0.0 < self.min_fill <= 1.0:
            raise ValueError(f"data.packing.min_fill={self.min_fill} must be in (0, 1]")
        for name in ("attention_weight", "vision_weight", "audio_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.packing.{name}={getattr(self, name)} must be >= 0")


LAYOUTS = ("processor", "report")


@dataclass
class DataConfig:
    """Where micro-batches come from.

    ``kind: synthetic``: learnable token sequences, no files (the text-only smoke stage).
    ``kind: energon``: conversations with media from megatron-energon datasets, chosen by
    ``blend`` (a file in ``data_blends/``) whose ``${...}`` dataset variables are set in
    ``paths``, or by ``path`` (one prepared energon dataset or metadataset).
    """

    kind: str = "synthetic"
    # How a sample becomes tokens (docs/data_format.md). "processor": exactly the input ids and
    # pixels of the released processor (transformers' NemotronH_Omni_Reasoning_V3Processor),
    # what HF/vLLM serving feeds the model: each audio stream is one encoder input, a video's
    # audio follows its frames. "report": the technical report's training layout: 30 s audio
    # clips, a video's audio interleaved with its frames in time, per-video patch budgets drawn
    # from model.vision.video_patch_budgets; the same markers and frame labels otherwise.
    layout: str = "processor"
    blend: str | None = None
    # Temperature sampling over the blend's entries: each weight w becomes w ** (1 / T).
    # 1: the blend as written; larger: flatter (every entry drawn more evenly). Only the tiny
    # CPU overlay sets it (recipes/scale/tiny/_common.yaml says why).
    blend_temperature: float = 1.0
    paths: dict[str, str] = field(default_factory=dict)
    path: str | None = None
    # Dataset root of `omni-train data synth`; with `blend`, every blend variable not in
    # `paths` points at the matching synthetic category under it (data_blends/synthetic.yaml).
    synthetic_root: str | None = None
    # What synthetic_root holds (omni-train data synth --flavour): "general" conversations, or
    # "learn": the learnability tasks (omni_train/datatools/learn_tasks.py), which the
    # curriculum's answer probe scores. The curriculum makes the root when it is missing.
    synthetic_flavour: str = "general"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    num_workers: int = 2  # decoding processes per data-parallel rank (0: in the main process)
    shuffle_buffer_size: int = 100  # samples; 0 reads shards in order
    max_samples_per_sequence: int = 100  # samples read in a row from one shard; 0: whole shard
    video_fps: float = 2.0  # frames sampled per second of video
    max_video_frames: int = 64  # more frames than this: spread evenly over the video
    # A sample is skipped (and counted, per reason) when it cannot be used; the stage stops
    # when the skipped share of samples read exceeds this, once `skip_check_min_samples` have
    # been read (a few early bad samples must not stop a stage).
    max_skip_fraction: float = 0.01
    skip_check_min_samples: int = 200
    eval_split: str = "val"
    # A sample longer than trainer.seq_length: "skip" it (counted as too_long), or "truncate" it
    # at a text boundary (media items past the cut are dropped, never cut in half).
    over_long: str = "skip"
    packing: PackingConfig = field(default_factory=PackingConfig)

    def __post_init__(self) -> None:
        if not self.blend_temperature > 0:
            raise ValueError(f"data.blend_temperature={self.blend_temperature} must be > 0")
        if self.over_long not in ("skip", "truncate"):
            raise ValueError(f"data.over_long={self.over_long!r}; valid: skip, truncate")
        if self.layout not in LAYOUTS:
            raise ValueError(f"data.layout={self.layout!r}; valid: {', '.join(LAYOUTS)}")
        if self.synthetic_flavour not in ("general", "learn"):
            raise ValueError(
                f"data.synthetic_flavour={self.synthetic_flavour!r}; valid: general, learn"
            )
        if self.kind not in ("synthetic", "energon"):
            raise ValueError(f"data.kind={self.kind!r}; valid: synthetic, energon")
        if self.kind == "energon" and (self.blend is None) == (self.path is None):
            raise ValueError(
                "data.kind=energon needs exactly one of data.blend (a data_blends/ name) and "
                "data.path (a prepared energon dataset or metadataset)"
            )
        if self.num_workers < 0 or self.shuffle_buffer_size < 0:
            raise ValueError("data.num_workers and data.shuffle_buffer_size must be >= 0")
        if self.max_samples_per_sequence < 0 or self.skip_check_min_samples < 0:
            raise ValueError(
                "data.max_samples_per_sequence and data.skip_check_min_samples must be >= 0"
            )
        positive("data", video_fps=self.video_fps, max_video_frames=self.max_video_frames)
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ValueError(f"data.max_skip_fraction={self.max_skip_fraction} must be in [0, 1]")
