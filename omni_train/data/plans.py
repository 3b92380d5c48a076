"""What each media item of a sample becomes before it is decoded: an image's patch grid, a
video's sampled frames and frame groups (with its audio track's clips), an audio stream's clips,
and the placeholder tokens of each (:mod:`omni_train.data.tokens` counts them). The chat
template (:mod:`omni_train.data.chat`) lays them out; the data layouts
(:mod:`omni_train.data.layouts`) decide where a video's audio goes."""

from __future__ import annotations

from dataclasses import dataclass

from omni_train.data import tokens


@dataclass(frozen=True)
class ImagePlan:
    rows: int  # patch grid after resizing
    cols: int

    @property
    def num_tokens(self) -> int:
        return tokens.grid_tokens(self.rows, self.cols)


@dataclass(frozen=True)
class VideoPlan:
    timestamps: tuple[float, ...]  # seconds of the sampled frames, ascending (for decoding)
    label_seconds: tuple[float, ...]  # the processor's label time of each sampled frame
    rows: int  # per-frame patch grid
    cols: int
    tubelet_frames: int  # 1: every frame is its own group
    audio_clips: tuple[int, ...] = ()  # tokens of each clip of the video's audio track
    audio_token_seconds: float = 0.08

    @property
    def num_groups(self) -> int:
        return tokens.video_groups(
            len(self.timestamps), self.tubelet_frames > 1, self.tubelet_frames
        )

    @property
    def tokens_per_group(self) -> int:
        return tokens.grid_tokens(self.rows, self.cols)

    @property
    def audio_tokens(self) -> int:
        return sum(self.audio_clips)

    def group_frames(self, g: int) -> tuple[int, int]:
        """First and last frame index (0-based) of group ``g``."""
        first = g * self.tubelet_frames
        return first, min(first + self.tubelet_frames, len(self.timestamps)) - 1

    def audio_chunks(self) -> list[int]:
        """The video's audio tokens per frame group by time, what ``report`` interleaves
        (:meth:`omni_train.data.layouts.ReportLayout.video_audio_chunks`): token k (starting
        at k x 80 ms) goes with the last group that starts at or before it."""
        starts = [self.timestamps[self.group_frames(g)[0]] for g in range(self.num_groups)]
        chunks = [0] * self.num_groups
        for k in range(self.audio_tokens):
            t = k * self.audio_token_seconds
            g = max((i for i, s in enumerate(starts) if s <= t + 1e-9), default=0)
            chunks[g] += 1
        return chunks


@dataclass(frozen=True)
class AudioPlan:
    num_samples: int  # after downmix and resampling
    clips: tuple[int, ...]  # tokens of each encoder input (clip) the stream becomes

    @property
    def num_tokens(self) -> int:
        return sum(self.clips)


Plan = ImagePlan | VideoPlan | AudioPlan


def media_tokens(plans: list[Plan]) -> tuple[int, int]:
    """(vision, audio) placeholder tokens of a sample's plans: image and video frame tokens;
    audio clips and video tracks."""
    vision = audio = 0
    for plan in plans:
        if isinstance(plan, ImagePlan):
            vision += plan.num_tokens
        elif isinstance(plan, VideoPlan):
            vision += plan.num_groups * plan.tokens_per_group
            audio += plan.audio_tokens
        else:
            audio += plan.num_tokens
    return vision, audio
