"""The data layouts (``data.layout``): how a sample becomes tokens, one object per layout.

Both layouts share the chat template, the markers (``<img>...</img>``,
``<so_start>...<so_end>``), the frame labels and the token accounting of
:mod:`omni_train.data.chat` and :mod:`omni_train.data.tokens`. They differ in three rules, and
each layout object owns its answer to all three:

- audio clipping (:meth:`DataLayout.audio_clip_samples`): ``processor`` keeps a stream whole,
  one encoder input, as the released processor does; ``report`` cuts it into clips of
  ``model.audio.clip_seconds`` (30 s), the last one holding the remainder;
- a video's audio (:attr:`DataLayout.audio_after_video`, :meth:`DataLayout.video_audio_chunks`):
  ``processor`` renders it as its own run after the video (``<video>`` newline
  ``<so_embedding>``, one encoder input for the whole track); ``report`` interleaves it in time:
  after each frame group, the audio tokens of the same time span in their own
  ``<so_start>...<so_end>`` run;
- video patch budgets (:meth:`DataLayout.video_patch_budget`): ``processor`` takes the largest of
  ``model.vision.video_patch_budgets`` (1,024 by default, the released video processor's
  ``video_target_num_patches``); ``report`` draws one per video from them in training (the same
  draw on every visit) and takes the largest in evaluation.

``processor`` follows the released Hugging Face processor (transformers 5.23
``nemotron_h_omni``, ``NemotronH_Omni_Reasoning_V3Processor``): the input ids and pixels HF and
vLLM serving feed the model. ``report`` follows the technical report's training layout.

The layout objects hold no state (frozen dataclasses): the task encoder, which is pickled into
every energon worker process, carries one, and a pickled copy equals the original.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from omni_train.config.data import LAYOUTS
from omni_train.config.model import AudioConfig
from omni_train.data import tokens
from omni_train.data.plans import VideoPlan


@dataclass(frozen=True)
class DataLayout(ABC):
    """One value of ``data.layout`` and the rules it decides (see the module docstring)."""

    name: ClassVar[str]
    # True: a video's audio track renders as its own placeholder after the video's (in the
    # prompt and in the expansion); False: it lives inside the frame groups
    # (:meth:`video_audio_chunks`)
    audio_after_video: ClassVar[bool]

    @abstractmethod
    def audio_clip_samples(self, num_samples: int, audio: AudioConfig | None) -> list[int]:
        """Sizes (in samples) of the encoder inputs one audio stream of ``num_samples``
        samples (after downmix and resampling) is cut into, in order."""

    @abstractmethod
    def video_audio_chunks(self, plan: VideoPlan) -> list[int]:
        """Audio tokens placed right after each frame group of ``plan``, one entry per group
        (all 0 when the video's audio is not interleaved)."""

    @abstractmethod
    def video_patch_budget(
        self, budgets: list[int], *, training: bool, seed: int, key: str, member: str
    ) -> int:
        """Target patch count per frame of the video ``member`` of sample ``key``, one of
        ``budgets`` (``model.vision.video_patch_budgets``)."""


@dataclass(frozen=True)
class ProcessorLayout(DataLayout):
    """The released processor's layout (transformers 5.23 ``nemotron_h_omni``)."""

    name: ClassVar[str] = "processor"
    audio_after_video: ClassVar[bool] = True

    def audio_clip_samples(self, num_samples: int, audio: AudioConfig | None) -> list[int]:
        """The whole stream as one encoder input, as the reference processor feeds it."""
        return tokens.audio_clip_samples(num_samples, audio, 0.0)

    def video_audio_chunks(self, plan: VideoPlan) -> list[int]:
        """None: the processor renders the video's audio after the video
        (``<video>`` newline ``<so_embedding>``), one run for the whole track."""
        return [0] * plan.num_groups

    def video_patch_budget(
        self, budgets: list[int], *, training: bool, seed: int, key: str, member: str
    ) -> int:
        """The largest budget (1,024 by default, the released video processor's
        ``video_target_num_patches``), in training and evaluation alike."""
        return max(budgets)


@dataclass(frozen=True)
class ReportLayout(DataLayout):
    """The technical report's training layout."""

    name: ClassVar[str] = "report"
    audio_after_video: ClassVar[bool] = False

    def audio_clip_samples(self, num_samples: int, audio: AudioConfig | None) -> list[int]:
        """Clips of ``model.audio.clip_seconds`` (30 s), the last one holding the remainder
        (:func:`omni_train.data.tokens.audio_clip_samples`)."""
        return tokens.audio_clip_samples(num_samples, audio, None)

    def video_audio_chunks(self, plan: VideoPlan) -> list[int]:
        """Interleaved in time: after each frame group, the audio tokens of the same span
        (:meth:`~omni_train.data.plans.VideoPlan.audio_chunks`), in their own
        ``<so_start>...<so_end>`` run."""
        return plan.audio_chunks()

    def video_patch_budget(
        self, budgets: list[int], *, training: bool, seed: int, key: str, member: str
    ) -> int:
        """Training: drawn from ``budgets`` by a hash of (seed, sample key, member), so the
        same video gets the same draw on every visit (resumes and restores reproduce it).
        Evaluation: the largest."""
        if not training:
            return max(budgets)
        digest = hashlib.sha256(f"{seed}/{key}/{member}".encode()).digest()
        return budgets[int.from_bytes(digest[:8], "little") % len(budgets)]


PROCESSOR = ProcessorLayout()
REPORT = ReportLayout()
_BY_NAME: dict[str, DataLayout] = {x.name: x for x in (PROCESSOR, REPORT)}


def layout_for(name: str) -> DataLayout:
    """The layout object of a ``data.layout`` value (the config keeps the name)."""
    if name not in _BY_NAME:
        raise ValueError(f"layout {name!r}; valid: {LAYOUTS}")
    return _BY_NAME[name]
