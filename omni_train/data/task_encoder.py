"""The energon task encoder: a prepared sample -> exactly what the omni model consumes.

Flow per sample (in energon's worker processes):

1. cook: the crude webdataset sample (member name -> bytes) becomes a :class:`Conversation`;
2. ``encode_sample``: parse the conversation, probe media headers, plan every media item
   (image grid, video frames and patch budget, audio clips), lay the sample out and check its
   length against the context *before* decoding; then decode and normalise the media;
3. ``batch``: pad a micro-batch to a common length (a multiple of ``pad_multiple``) and gather
   the media with the row each item belongs to.

A bad sample raises :class:`~omni_train.data.conversation.SampleError`; it is skipped
(energon's ``SkipSample``), logged with its key and counted per reason. The counts travel to the
trainer on the next batch of the same worker (``OmniBatch.skipped``); nothing is lost between
workers and the trainer because a batch is the only way data reaches it.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter

import torch
from megatron.energon import (
    Batch,
    Cooker,
    CrudeSample,
    DefaultTaskEncoder,
    Sample,
    SkipSample,
    basic_sample_keys,
    stateless,
)
from megatron.energon.edataclass import edataclass

from omni_train.config.schema import AudioConfig, TokenizerConfig, VisionConfig
from omni_train.data import media_io, tokens
from omni_train.data.chat import AudioPlan, ImagePlan, Layout, Plan, VideoPlan, layout
from omni_train.data.conversation import SampleError, parse_conversation
from omni_train.data.media import Media
from omni_train.data.tokenizer import load_tokenizer

log = logging.getLogger("omni_train.data")

CONVERSATION_MEMBER = "json"


@edataclass
class Conversation(Sample):
    """A cooked sample: the conversation member's bytes and the media members' bytes."""

    conversation: bytes | None
    members: dict


@stateless
def cook_conversation(sample: CrudeSample) -> Conversation:
    members = {
        k: v for k, v in sample.items() if not k.startswith("__") and k != CONVERSATION_MEMBER
    }
    return Conversation(
        **basic_sample_keys(sample),
        conversation=sample.get(CONVERSATION_MEMBER),
        members=members,
    )


def cook_raw(key: str, members: dict[str, bytes], category: str = "") -> Conversation:
    """A cooked sample built outside energon (tests, benchmarks, inspection): ``members``
    holds every member of the sample, the conversation's ``json`` included."""
    crude = {"__key__": key, "__restore_key__": (), "__sources__": ()}
    return cook_conversation({**crude, "__subflavors__": {"category": category}, **members})


@edataclass
class OmniSample(Sample):
    """One encoded conversation. ``tokens``/``labels``/``loss_mask``: [L]; ``labels[i]`` is
    ``tokens[i+1]`` (the last label is padding without loss)."""

    tokens: torch.Tensor  # int64 [L]
    labels: torch.Tensor  # int64 [L]
    loss_mask: torch.Tensor  # float32 [L]
    images: list  # [3, H, W] each, CLIP-normalised
    videos: list  # [F, 3, H, W] each
    audio: list  # [n] mono 16 kHz each (a video's audio track included, in part order)
    category: str


@edataclass
class OmniBatch(Batch):
    """A micro-batch: ``tokens``/``labels``/``position_ids`` int64 [b, s], ``loss_mask`` float32
    [b, s] (0 on padding); ``media`` with the row of each item; bookkeeping of skipped samples
    (``skipped``: reason -> count since this worker's previous batch; ``num_read``: samples
    read, skipped ones included)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    media: Media
    keys: list
    categories: list
    num_real_tokens: int
    skipped: dict
    num_read: int


class OmniTaskEncoder(DefaultTaskEncoder[Conversation, OmniSample, OmniBatch, OmniBatch]):
    """Encodes conversations for a model with ``vision``/``audio`` configs (None: that modality
    is not accepted; samples using it are an error of the blend, not of the sample)."""

    decoder = None  # media stay bytes: decoding errors must be ours to classify and count
    cookers = [Cooker(cook_conversation)]

    def __init__(
        self,
        *,
        tokenizer: TokenizerConfig,
        vision: VisionConfig | None,
        audio: AudioConfig | None,
        context_length: int,
        pad_id: int | None = None,
        pad_multiple: int = 1,
        video_fps: float = 2.0,
        max_video_frames: int = 64,
        training: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        self.tokenizer_cfg = tokenizer
        self.vision = vision
        self.audio_cfg = audio
        self.context_length = context_length
        self.pad_multiple = pad_multiple
        self.video_fps = video_fps
        self.max_video_frames = max_video_frames
        self.training = training
        self.seed = seed
        self._pad_id = pad_id
        self._skipped: Counter[str] = Counter()
        self._num_read = 0

    @property
    def tok(self):
        # loaded lazily: the encoder is pickled into every worker process
        return load_tokenizer(self.tokenizer_cfg)

    # -- per sample ------------------------------------------------------------------------

    @stateless
    def encode_sample(self, sample: Conversation) -> OmniSample:
        self._num_read += 1
        try:
            return self.encode(sample)
        except SampleError as e:
            self._skipped[e.reason] += 1
            log.warning("skipping sample %s: %s", sample.__key__, e)
            raise SkipSample() from e

    def encode(self, sample: Conversation) -> OmniSample:
        """Encode one sample or raise SampleError (no counting: see ``encode_sample``)."""
        turns = parse_conversation(sample.conversation, set(sample.members))
        for turn in turns:
            for part in turn.parts:
                forged = self.tok.media_strings_in(part.text)
                if forged:
                    raise SampleError(
                        "placeholder_mismatch", f"text contains media token strings {forged}"
                    )
        parts = [p for t in turns for p in t.parts if p.kind != "text"]
        plans, audio = [], {}
        for part in parts:
            plan, wav = self._plan(sample, part)
            plans.append(plan)
            if wav is not None:
                audio[id(part)] = wav
        lay = layout(turns, plans, self.tok)
        if lay.num_tokens > self.context_length:
            raise SampleError(
                "too_long",
                f"{lay.num_tokens} tokens exceed the context length {self.context_length}",
            )
        images, videos, streams = [], [], []
        for part, plan in zip(parts, plans, strict=True):
            data = sample.members[part.member]
            if isinstance(plan, ImagePlan):
                images.append(self._decode(media_io.decode_image, "image", data, plan))
            elif isinstance(plan, VideoPlan):
                videos.append(self._decode(media_io.decode_video_frames, "video", data, plan))
            if id(part) in audio:
                streams.append(audio[id(part)])
        return self._finish(sample, lay, images, videos, streams)

    def _finish(self, sample: Conversation, lay: Layout, images, videos, audio) -> OmniSample:
        ids, loss = lay.materialize()
        assert len(ids) == lay.num_tokens  # the accounting and the layout agree by construction
        t = torch.tensor(ids, dtype=torch.int64)
        labels = torch.cat([t[1:], t.new_full((1,), self.pad_id)])
        mask = torch.tensor(loss[1:] + [False], dtype=torch.float32)
        return OmniSample.derive_from(
            sample,
            tokens=t,
            labels=labels,
            loss_mask=mask,
            images=images,
            videos=videos,
            audio=audio,
            category=(sample.__subflavors__ or {}).get("category", ""),
        )

    @property
    def pad_id(self) -> int:
        return self.tok.specials.pad if self._pad_id is None else self._pad_id

    def _decode(self, fn, kind: str, data: bytes, plan: Plan) -> torch.Tensor:
        p = self.vision.patch_size
        try:
            if kind == "image":
                return fn(data, plan.cols * p, plan.rows * p)
            return fn(data, list(plan.timestamps), plan.cols * p, plan.rows * p)
        except media_io.MediaError as e:
            raise SampleError(f"undecodable_{kind}", str(e)) from None

    def _plan(self, sample: Conversation, part) -> tuple[Plan, torch.Tensor | None]:
        """Metadata-only plan of one media part (+ its decoded audio: audio is cheap to
        decode and its exact length after resampling decides its token count)."""
        data = sample.members[part.member]
        if part.kind in ("image", "video") and self.vision is None:
            raise ValueError(f"sample {sample.__key__} has {part.kind} but the model has no vision")
        if (part.kind == "audio" or part.audio_member) and self.audio_cfg is None:
            raise ValueError(f"sample {sample.__key__} has audio but the model has no audio")
        v = self.vision
        try:
            if part.kind == "image":
                w, h = media_io.probe_image(data)
                rows, cols = tokens.image_grid(
                    w, h, patch=v.patch_size, min_patches=v.min_patches, max_patches=v.max_patches
                )
                return ImagePlan(rows, cols), None
            if part.kind == "audio":
                wav = self._audio(data, media_io.decode_audio)
                return AudioPlan(wav.shape[0], self._audio_tokens(wav)), wav
            info = media_io.probe_video(data)
        except media_io.MediaError as e:
            raise SampleError(f"undecodable_{e.kind}", str(e)) from None
        stamps = media_io.sample_video_timestamps(info, self.video_fps, self.max_video_frames)
        budget = self._patch_budget(sample.__key__, part.member)
        rows, cols = tokens.frame_grid(info.width, info.height, budget, patch=v.patch_size)
        wav, n_audio = None, 0
        if part.audio_member:
            src = sample.members[part.audio_member]
            decode = (
                media_io.decode_video_audio
                if part.audio_member == part.member
                else media_io.decode_audio
            )
            wav = self._audio(src, decode)
            n_audio = self._audio_tokens(wav)
        plan = VideoPlan(
            tuple(stamps),
            rows,
            cols,
            v.tubelet_frames,
            n_audio,
            tokens.audio_token_seconds(self.audio_cfg) if self.audio_cfg else 0.08,
        )
        return plan, wav

    def _audio(self, data: bytes, decode) -> torch.Tensor:
        try:
            wav = decode(data, self.audio_cfg.sample_rate)
        except media_io.MediaError as e:
            raise SampleError("undecodable_audio", str(e)) from None
        if self._audio_tokens(wav) == 0:
            raise SampleError("undecodable_audio", f"{wav.shape[0]} samples: shorter than 1 token")
        return wav

    def _audio_tokens(self, wav: torch.Tensor) -> int:
        return tokens.audio_tokens_for_samples(wav.shape[0], self.audio_cfg)

    def _patch_budget(self, key: str, member: str) -> int:
        """Per-video patch budget: drawn from the configured budgets in training (the same
        draw for the same video on every visit, so resumes and restores reproduce it); the
        largest budget in evaluation."""
        budgets = self.vision.video_patch_budgets
        if not self.training:
            return max(budgets)
        digest = hashlib.sha256(f"{self.seed}/{key}/{member}".encode()).digest()
        return budgets[int.from_bytes(digest[:8], "little") % len(budgets)]

    # -- per micro-batch -------------------------------------------------------------------

    def batch(self, samples: list[OmniSample]) -> OmniBatch:
        lengths = [s.tokens.shape[0] for s in samples]
        s_max = -(-max(lengths) // self.pad_multiple) * self.pad_multiple
        b = len(samples)
        toks = torch.full((b, s_max), self.pad_id, dtype=torch.int64)
        labels = torch.full((b, s_max), self.pad_id, dtype=torch.int64)
        mask = torch.zeros(b, s_max, dtype=torch.float32)
        media = Media(sample_names=[s.__key__ for s in samples])
        for row, (smp, n) in enumerate(zip(samples, lengths, strict=True)):
            toks[row, :n], labels[row, :n], mask[row, :n] = smp.tokens, smp.labels, smp.loss_mask
            for items, owners, new in (
                (media.images, media.image_sample, smp.images),
                (media.videos, media.video_sample, smp.videos),
                (media.audio, media.audio_sample, smp.audio),
            ):
                items += new
                owners += [row] * len(new)
        skipped, self._skipped = dict(self._skipped), Counter()
        num_read, self._num_read = self._num_read, 0
        return OmniBatch.from_samples(
            samples,
            tokens=toks,
            labels=labels,
            loss_mask=mask,
            position_ids=torch.arange(s_max, dtype=torch.int64).expand(b, s_max).contiguous(),
            media=media,
            keys=[s.__key__ for s in samples],
            categories=[s.category for s in samples],
            num_real_tokens=sum(lengths),
            skipped=skipped,
            num_read=num_read,
        )

    def encode_batch(self, batch: OmniBatch) -> OmniBatch:
        return batch
