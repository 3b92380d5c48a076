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
    - ``audio``: ``[n]`` mono float waveform at the audio encoder's sample rate, one encoder
      input (clip) each; a sample's clips fill its audio placeholders in order.

    ``vision_kinds`` gives, for every image and video in token order, its kind: video frames
    fill image placeholders (the released layout has no video token), so the order of images
    and videos within a sample decides which features go where. Left empty, it is filled as
    "each sample's images, then its videos".
    """

    images: list[torch.Tensor] = field(default_factory=list)
    image_sample: list[int] = field(default_factory=list)
    videos: list[torch.Tensor] = field(default_factory=list)
    video_sample: list[int] = field(default_factory=list)
    audio: list[torch.Tensor] = field(default_factory=list)
    audio_sample: list[int] = field(default_factory=list)
    sample_names: list[str] | None = None  # for error messages (e.g. the dataset key)
    vision_kinds: list[str] = field(default_factory=list)

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
        if not self.vision_kinds:
            for s in sorted(set(self.image_sample) | set(self.video_sample)):
                self.vision_kinds += ["image"] * self.image_sample.count(s)
                self.vision_kinds += ["video"] * self.video_sample.count(s)
        if sorted(self.vision_kinds) != sorted(
            ["image"] * len(self.images) + ["video"] * len(self.videos)
        ):
            raise ValueError(
                f"Media: vision_kinds {self.vision_kinds} do not list the {len(self.images)} "
                f"images and {len(self.videos)} videos"
            )

    def vision_items(self) -> list[tuple[str, int, int]]:
        """``(kind, index within its list, sample)`` of every image and video, in token order."""
        out, i, v = [], 0, 0
        for kind in self.vision_kinds:
            if kind == "image":
                out.append((kind, i, self.image_sample[i]))
                i += 1
            else:
                out.append((kind, v, self.video_sample[v]))
                v += 1
        return out

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
            list(self.vision_kinds),
        )

    def name(self, sample: int) -> str:
        if self.sample_names and sample < len(self.sample_names):
            return f"sample {sample} ({self.sample_names[sample]!r})"
        return f"sample {sample}"
