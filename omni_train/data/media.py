"""The media half of a micro-batch: what the data side hands the model next to the tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Media:
    """Media items of one micro-batch, each with the index of the sample it belongs to.

    A "sample" is a row of an unpacked ``[b, s]`` batch, or a segment (``cu_seqlens``) of a
    packed one. Within a modality, items are listed in the order their placeholder runs appear
    in the token stream (sample by sample, left to right).

    - ``images``: ``[3, H, W]`` normalised pixels, H and W multiples of 32;
    - ``videos``: ``[F, 3, H, W]`` frames in time order;
    - ``audio``: ``[n]`` mono float waveform at the audio encoder's sample rate.
    """

    images: list[torch.Tensor] = field(default_factory=list)
    image_sample: list[int] = field(default_factory=list)
    videos: list[torch.Tensor] = field(default_factory=list)
    video_sample: list[int] = field(default_factory=list)
    audio: list[torch.Tensor] = field(default_factory=list)
    audio_sample: list[int] = field(default_factory=list)
    sample_names: list[str] | None = None  # for error messages (e.g. the dataset key)

    def __post_init__(self) -> None:
        for kind in ("image", "video"):
            items, owners = getattr(self, kind + "s"), getattr(self, kind + "_sample")
            if len(items) != len(owners):
                raise ValueError(f"Media: {len(items)} {kind}s but {len(owners)} owners")
        if len(self.audio) != len(self.audio_sample):
            raise ValueError(f"Media: {len(self.audio)} audio streams but {len(self.audio_sample)}")
        for kind in ("image", "video", "audio"):
            owners = getattr(self, kind + "_sample")
            if owners != sorted(owners):
                # features fill placeholders in token order, so items must come sample by sample
                raise ValueError(f"Media: {kind} items must be in sample order, got {owners}")

    def to(self, device) -> Media:
        move = lambda xs: [x.to(device, non_blocking=True) for x in xs]  # noqa: E731
        return Media(
            move(self.images),
            list(self.image_sample),
            move(self.videos),
            list(self.video_sample),
            move(self.audio),
            list(self.audio_sample),
            self.sample_names,
        )

    def name(self, sample: int) -> str:
        if self.sample_names and sample < len(self.sample_names):
            return f"sample {sample} ({self.sample_names[sample]!r})"
        return f"sample {sample}"
