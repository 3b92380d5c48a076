"""ChatML-style template: a conversation plus media plans -> token ids and a loss mask.

Each turn is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``. Only assistant content and its
closing ``<|im_end|>`` carry loss (reasoning traces ``<think>...</think>`` are ordinary
assistant text); the role header, system/user turns, media and padding never do. Parts of one
turn are joined by a newline.

Media become placeholder runs, one placeholder per projected feature, each run wrapped in its
markers:

- image: ``<img>`` + n x ``<image>`` + ``</img>``;
- video: per frame group (a tubelet pair, or one frame) its timestamp as text, then
  ``<vid>`` + n x ``<video>`` + ``</vid>``; when the video has audio, the audio tokens of the
  same time span follow as ``<sound>`` + k x ``<audio>`` + ``</sound>`` (temporal interleaving);
- audio: ``<sound>`` + n x ``<audio>`` + ``</sound>``.

The layout (:func:`layout`) is computed from media *metadata* only, so a sample's length is
known before any pixel is decoded; :func:`omni_train.data.tokens.sample_tokens` turns it into
the whole-sample count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omni_train.data import tokens
from omni_train.data.conversation import Turn
from omni_train.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class ImagePlan:
    rows: int  # patch grid after resizing
    cols: int

    @property
    def num_tokens(self) -> int:
        return tokens.grid_tokens(self.rows, self.cols)


@dataclass(frozen=True)
class VideoPlan:
    timestamps: tuple[float, ...]  # seconds of the sampled frames, ascending
    rows: int  # per-frame patch grid (the video's patch budget applied)
    cols: int
    tubelet_frames: int  # 1: every frame is its own group
    audio_tokens: int = 0  # tokens of the video's audio track (0: none), interleaved by time
    audio_token_seconds: float = 0.08

    @property
    def num_groups(self) -> int:
        return tokens.video_groups(
            len(self.timestamps), self.tubelet_frames > 1, self.tubelet_frames
        )

    @property
    def tokens_per_group(self) -> int:
        return tokens.grid_tokens(self.rows, self.cols)

    def group_frames(self, g: int) -> tuple[int, int]:
        """First and last frame index (0-based) of group ``g``."""
        first = g * self.tubelet_frames
        return first, min(first + self.tubelet_frames, len(self.timestamps)) - 1

    def audio_chunks(self) -> list[int]:
        """Audio tokens placed after each frame group: token k (starting at k x 80 ms) goes
        with the last group that starts at or before it."""
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
    num_tokens: int


Plan = ImagePlan | VideoPlan | AudioPlan


@dataclass
class Layout:
    """A sample as text pieces and placeholder runs, in order; ``loss[i]`` marks loss pieces."""

    pieces: list[list[int] | tuple[int, int]] = field(default_factory=list)  # ids | (id, n)
    loss: list[bool] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)  # media part index per piece; -1: text
    current_part: int = -1  # set by layout() while it lays out a media part

    def text(self, ids: list[int], loss: bool = False) -> None:
        self.pieces.append(ids)
        self.loss.append(loss)
        self.owner.append(self.current_part)

    def run(self, start: int, placeholder: int, n: int, end: int) -> None:
        if n:
            self.text([start])
            self.pieces.append((placeholder, n))
            self.loss.append(False)
            self.owner.append(self.current_part)
            self.text([end])

    @property
    def num_tokens(self) -> int:
        text = sum(len(p) for p in self.pieces if isinstance(p, list))
        runs = [p[1] for p in self.pieces if isinstance(p, tuple)]
        # each run's two markers were added as text pieces: count them on the run's side
        return tokens.sample_tokens(text - tokens.MARKERS_PER_RUN * len(runs), runs)

    def truncate(self, limit: int) -> tuple[Layout, int]:
        """The longest prefix of at most ``limit`` tokens that cuts only text: a media part
        (an image's run, a video's frame labels and runs, an audio run) is kept whole or not at
        all. Returns the prefix and how many media parts it keeps (parts come in order)."""
        out = Layout()
        used, kept, i = 0, 0, 0
        size = lambda p: len(p) if isinstance(p, list) else p[1]  # noqa: E731
        while i < len(self.pieces):
            part = self.owner[i]
            if part >= 0:
                j = i
                while j < len(self.pieces) and self.owner[j] == part:
                    j += 1
                n = sum(size(p) for p in self.pieces[i:j])
                if used + n > limit:
                    break
                for k in range(i, j):
                    out.pieces.append(self.pieces[k])
                    out.loss.append(self.loss[k])
                    out.owner.append(part)
                used, kept, i = used + n, part + 1, j
                continue
            piece = self.pieces[i]
            take = piece[: limit - used]
            if take:
                out.text(list(take), self.loss[i])
                used += len(take)
            if len(take) < len(piece):
                break
            i += 1
        return out, kept

    def materialize(self) -> tuple[list[int], list[bool]]:
        """Token ids and, per token, whether it carries loss."""
        ids: list[int] = []
        loss: list[bool] = []
        for piece, on in zip(self.pieces, self.loss, strict=True):
            chunk = list(piece) if isinstance(piece, list) else [piece[0]] * piece[1]
            ids += chunk
            loss += [on] * len(chunk)
        return ids, loss


def frame_label(plan: VideoPlan, g: int) -> str:
    """Timestamp text before frame group ``g`` (frames are numbered from 1)."""
    a, b = plan.group_frames(g)
    if a == b:
        return f"Frame {a + 1} at {plan.timestamps[a]:.2f}s: "
    return f"Frames {a + 1}-{b + 1} at {plan.timestamps[a]:.2f}s-{plan.timestamps[b]:.2f}s: "


def layout(turns: list[Turn], plans: list[Plan], tok: Tokenizer) -> Layout:
    """Lay out ``turns``; ``plans`` holds one plan per media part, in part order."""
    s = tok.specials
    out = Layout()
    todo = iter(plans)
    num_parts = 0
    for turn in turns:
        learn = turn.role == "assistant"
        out.text([s.im_start] + tok.encode(f"{turn.role}\n"))
        for i, part in enumerate(turn.parts):
            if i:
                out.text(tok.encode("\n"), learn)
            if part.kind == "text":
                out.text(tok.encode(part.text), learn)
                continue
            plan = next(todo)
            out.current_part, num_parts = num_parts, num_parts + 1
            if isinstance(plan, ImagePlan):
                out.run(s.image_start, s.image, plan.num_tokens, s.image_end)
            elif isinstance(plan, AudioPlan):
                out.run(s.audio_start, s.audio, plan.num_tokens, s.audio_end)
            else:
                chunks = plan.audio_chunks()
                for g in range(plan.num_groups):
                    out.text(tok.encode(frame_label(plan, g)))
                    out.run(s.video_start, s.video, plan.tokens_per_group, s.video_end)
                    out.run(s.audio_start, s.audio, chunks[g], s.audio_end)
            out.current_part = -1
        out.text([s.im_end], learn)
        out.text(tok.encode("\n"))
    if next(todo, None) is not None:
        raise AssertionError("more media plans than media parts")
    return out
