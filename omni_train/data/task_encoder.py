"""The energon task encoder: a prepared sample -> exactly what the omni model consumes.

Flow per sample (in energon's worker processes):

1. cook: the crude webdataset sample (member name -> bytes) becomes a :class:`Conversation`;
2. ``preencode_sample`` (plan): parse the conversation, probe media headers, plan every media
   item (image grid, video frames and patch budget, audio clips), lay the sample out and check
   its length against the context (skip, or truncate at a text boundary) -- no pixel decoded;
3. ``postencode_sample`` (decode): decode and normalise the media of a planned sample;
4. unpacked: ``batch`` pads a micro-batch to a common length (a multiple of ``pad_multiple``)
   and gathers the media with the row each item belongs to; packed (``packing`` set): the
   online packer (:mod:`omni_train.data.packed`) buffers *planned* samples, decodes only the
   samples of the bins it emits, and ``pack_selected_samples`` concatenates a bin into one THD
   sequence.

A bad sample raises :class:`~omni_train.data.conversation.SampleError`; it is skipped
(energon's ``SkipSample``), logged with its key and counted per reason. The counts travel to the
trainer on the next batch of the same worker (``OmniBatch.skipped``); nothing is lost between
workers and the trainer because a batch is the only way data reaches it.
"""

from __future__ import annotations

import contextlib
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
from megatron.energon.wrappers.batch_dataset import BatchDataset

from omni_train.config.data import PackingConfig, TokenizerConfig
from omni_train.config.model import AudioConfig, VisionConfig
from omni_train.data import media_io, tokens
from omni_train.data.chat import Layout, layout
from omni_train.data.conversation import NoUsableSampleError, SampleError, parse_conversation
from omni_train.data.layouts import PROCESSOR, DataLayout
from omni_train.data.media import Media
from omni_train.data.packed import OnlinePackingDataset
from omni_train.data.packing import CostWeights, sample_cost
from omni_train.data.plans import AudioPlan, ImagePlan, Plan, VideoPlan, media_tokens
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
class PlannedSample(Sample):
    """A sample laid out from media metadata, not yet decoded: what the packer buffers."""

    members: dict  # member name -> bytes
    parts: list  # the media parts (conversation.Part), in order
    plans: list  # one Plan per media part
    layout: Layout
    category: str
    num_tokens: int
    vision_tokens: int  # image + video placeholder tokens
    audio_tokens: int


@edataclass
class OmniSample(Sample):
    """One encoded conversation. ``tokens``/``labels``/``loss_mask``: [L]; ``labels[i]`` is
    ``tokens[i+1]`` (the last label is padding without loss)."""

    tokens: torch.Tensor  # int64 [L]
    labels: torch.Tensor  # int64 [L]
    loss_mask: torch.Tensor  # float32 [L]
    images: list  # [3, H, W] each, CLIP-normalised
    videos: list  # [F, 3, H, W] each
    audio: list  # [n] mono 16 kHz clips: each one encoder input (video tracks too), in order
    vision_kinds: list  # "image" | "video" per vision item, in token order
    category: str


@edataclass
class PackedSample(Sample):
    """One THD packed sequence of ``T`` tokens (a multiple of the total pad multiple).

    ``tokens``/``labels``/``position_ids`` int64 [T], ``loss_mask`` float32 [T] (0 on padding
    and on each sample's last token), ``position_ids`` restart at 0 for every sample;
    ``cu_seqlens`` int32 [n+1] real sample boundaries, ``cu_seqlens_padded`` int32 [n+1] the
    boundaries with each sample padded to the per-sample multiple (the tail padding belongs to
    the last sample); ``media`` items owned by segment index.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_seqlens_padded: torch.Tensor
    media: Media
    keys: list
    categories: list
    num_real_tokens: int


@edataclass
class OmniBatch(Batch):
    """A micro-batch: ``tokens``/``labels``/``position_ids`` int64 [b, s], ``loss_mask`` float32
    [b, s] (0 on padding); ``media`` with the row (or packed segment) of each item; bookkeeping
    of skipped samples (``skipped``: reason -> count since this worker's previous batch;
    ``num_read``: samples read, skipped ones included). Packed: ``b = 1`` and ``cu_seqlens`` /
    ``cu_seqlens_padded`` (int32 [n+1]) mark the samples; None when unpacked."""

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
    cu_seqlens: torch.Tensor | None = None
    cu_seqlens_padded: torch.Tensor | None = None


class OmniTaskEncoder(DefaultTaskEncoder[Conversation, OmniSample, OmniBatch, OmniBatch]):
    """Encodes conversations for a model with ``vision``/``audio`` configs (None: that modality
    is not accepted; samples using it are an error of the blend, not of the sample), in the
    data layout ``layout`` (:mod:`omni_train.data.layouts`: audio clips, a video's audio, video
    patch budgets).

    ``packing``: pack into THD sequences, dealing bins over ``num_ranks`` ranks of which this
    is ``rank`` (global balance: every rank plans the same stream), each sample padded to
    ``sample_pad_multiple`` tokens. ``count_reads``: count samples read and planning skips
    (false on all but one rank when every rank plans the same stream, so totals add up).
    """

    decoder = None  # media stay bytes: decoding errors must be ours to classify and count
    cookers = [Cooker(cook_conversation)]

    def __init__(
        self,
        *,
        tokenizer: TokenizerConfig,
        vision: VisionConfig | None,
        audio: AudioConfig | None,
        context_length: int,
        layout: DataLayout = PROCESSOR,
        pad_id: int | None = None,
        pad_multiple: int = 1,
        video_fps: float = 2.0,
        max_video_frames: int = 64,
        training: bool = True,
        seed: int = 0,
        over_long: str = "skip",
        packing: PackingConfig | None = None,
        num_ranks: int = 1,
        rank: int = 0,
        sample_pad_multiple: int = 1,
        count_reads: bool = True,
        max_consecutive_skips: int | None = None,
    ):
        super().__init__()
        self.tokenizer_cfg = tokenizer
        self.vision = vision
        self.audio_cfg = audio
        self.context_length = context_length
        self.layout = layout
        self.pad_multiple = pad_multiple
        self.video_fps = video_fps
        self.max_video_frames = max_video_frames
        self.training = training
        self.seed = seed
        self._pad_id = pad_id
        self.over_long = over_long
        self.packing = packing
        self.cost_weights = (
            CostWeights(packing.attention_weight, packing.vision_weight, packing.audio_weight)
            if packing
            else None
        )
        self.num_ranks, self.rank = num_ranks, rank
        self.sample_pad_multiple = sample_pad_multiple
        self.count_reads = count_reads
        # the skip guard where no step completes: this many samples in a row skipped, none
        # usable in between, stops the stage (None: never)
        self.max_consecutive_skips = max_consecutive_skips
        self._consecutive: Counter[str] = Counter()
        self._skipped: Counter[str] = Counter()
        self._num_read = 0
        self._quiet = False

    @property
    def tok(self):
        # loaded lazily: the encoder is pickled into every worker process
        return load_tokenizer(self.tokenizer_cfg)

    # -- per sample ------------------------------------------------------------------------

    @stateless
    def preencode_sample(self, sample: Conversation) -> PlannedSample:
        counting = self.count_reads and not self._quiet
        if counting:
            self._num_read += 1
        try:
            return self.plan(sample)
        except SampleError as e:
            if counting:
                self._skip(sample.__key__, e)
            elif not self._quiet:
                self._unusable(e)
            raise SkipSample() from e

    @stateless
    def postencode_sample(self, sample: PlannedSample) -> OmniSample:
        try:
            out = self.decode(sample)
        except SampleError as e:
            if not self._quiet:
                self._skip(sample.__key__, e)
            raise SkipSample() from e
        self._consecutive.clear()  # a usable sample
        return out

    def _skip(self, key: str, e: SampleError) -> None:
        self._skipped[e.reason] += 1
        log.warning("skipping sample %s: %s", key, e)
        self._unusable(e)

    def _unusable(self, e: SampleError) -> None:
        self._consecutive[e.reason] += 1
        n = sum(self._consecutive.values())
        if self.max_consecutive_skips is not None and n >= self.max_consecutive_skips:
            raise NoUsableSampleError(
                f"the last {n} samples this data worker read were all skipped "
                f"({dict(self._consecutive)}) and none could be used: no micro-batch can be "
                "made. Fix the data (the log names every skipped sample), or raise "
                "data.skip_check_min_samples"
            )

    @contextlib.contextmanager
    def quiet(self):
        """Samples re-read inside the block (the packer fetching a planned sample again) are
        not counted a second time."""
        self._quiet = True
        try:
            yield
        finally:
            self._quiet = False

    def encode(self, sample: Conversation) -> OmniSample:
        """Plan and decode one sample or raise SampleError (no counting)."""
        return self.decode(self.plan(sample))

    def plan(self, sample: Conversation) -> PlannedSample:
        """Lay a sample out from media metadata (decodes audio only, to measure it)."""
        turns = parse_conversation(sample.conversation, set(sample.members))
        parts = [p for t in turns for p in t.parts if p.kind != "text"]
        plans = [self._plan(sample, part) for part in parts]
        lay = layout(turns, plans, self.tok, self.layout)
        if lay.num_tokens > self.context_length:
            too_long = SampleError(
                "too_long",
                f"{lay.num_tokens} tokens exceed the context length {self.context_length}",
            )
            if self.over_long != "truncate":
                raise too_long
            lay, kept = lay.truncate(self.context_length)
            if not any(lay.loss):
                raise too_long  # nothing left to learn from before the cut
            parts, plans = parts[:kept], plans[:kept]
        return self.planned(sample, parts, plans, lay)

    def planned(self, sample: Conversation, parts, plans, lay: Layout) -> PlannedSample:
        """The planned sample of ``sample`` laid out as ``lay`` (its media ``parts``/``plans``)."""
        vision, audio = media_tokens(plans)
        return PlannedSample.derive_from(
            sample,
            members=sample.members,
            parts=parts,
            plans=plans,
            layout=lay,
            category=(sample.__subflavors__ or {}).get("category", ""),
            num_tokens=lay.num_tokens,
            vision_tokens=vision,
            audio_tokens=audio,
        )

    def decode(self, sample: PlannedSample) -> OmniSample:
        """Decode the media of a planned sample or raise SampleError."""
        images, videos, clips, kinds = [], [], [], []
        for part, plan in zip(sample.parts, sample.plans, strict=True):
            data = sample.members[part.member]
            if isinstance(plan, ImagePlan):
                images.append(self._decode(media_io.decode_image, "image", data, plan))
                kinds.append("image")
            elif isinstance(plan, VideoPlan):
                videos.append(self._decode(media_io.decode_video_frames, "video", data, plan))
                kinds.append("video")
                if part.audio_member:
                    clips += self._clips(self._track(sample.members, part))
            else:
                clips += self._clips(self._audio(data, media_io.decode_audio))
        return self._finish(sample, sample.layout, images, videos, clips, kinds)

    def _clips(self, wav: torch.Tensor) -> list[torch.Tensor]:
        """One stream ``[n]`` -> its encoder inputs ``[n_i]``, as the layout cuts it."""
        return list(torch.split(wav, self.layout.audio_clip_samples(wav.shape[0], self.audio_cfg)))

    def _finish(
        self, sample: PlannedSample, lay: Layout, images, videos, audio, kinds
    ) -> OmniSample:
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
            vision_kinds=kinds,
            category=sample.category,
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

    def _plan(self, sample: Conversation, part) -> Plan:
        """Metadata-only plan of one media part (audio is decoded to measure it: its exact
        length after resampling decides its token count; the waveform is not kept)."""
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
                return ImagePlan(rows, cols)
            if part.kind == "audio":
                wav = self._audio(data, media_io.decode_audio)
                return AudioPlan(wav.shape[0], self._audio_tokens(wav))
            info = media_io.probe_video(data)
        except media_io.MediaError as e:
            raise SampleError(f"undecodable_{e.kind}", str(e)) from None
        stamps = media_io.sample_video_timestamps(info, self.video_fps, self.max_video_frames)
        target = self._patch_budget(sample.__key__, part.member)
        rows, cols = tokens.frame_grid(info.width, info.height, target, patch=v.patch_size)
        clips = self._audio_tokens(self._track(sample.members, part)) if part.audio_member else ()
        return VideoPlan(
            tuple(stamps),
            tuple(media_io.frame_label_seconds(info, stamps)),
            rows,
            cols,
            v.tubelet_frames,
            clips,
            tokens.audio_token_seconds(self.audio_cfg) if self.audio_cfg else 0.08,
        )

    def _track(self, members: dict, part) -> torch.Tensor:
        """The audio of a video part: its own track, or a separate audio member."""
        own = part.audio_member == part.member
        decode = media_io.decode_video_audio if own else media_io.decode_audio
        return self._audio(members[part.audio_member], decode)

    def _audio(self, data: bytes, decode) -> torch.Tensor:
        try:
            wav = decode(data, self.audio_cfg.sample_rate)
        except media_io.MediaError as e:
            raise SampleError("undecodable_audio", str(e)) from None
        a = self.audio_cfg
        if wav.shape[0] < a.min_samples:
            raise SampleError(
                "audio_too_short",
                f"{wav.shape[0] / a.sample_rate:.3f} s of audio; the encoder takes streams of at "
                f"least {a.min_samples / a.sample_rate:g} s (model.audio.min_seconds)",
            )
        return wav

    def _audio_tokens(self, wav: torch.Tensor) -> tuple[int, ...]:
        """Tokens of each encoder input one stream becomes."""
        sizes = self.layout.audio_clip_samples(wav.shape[0], self.audio_cfg)
        return tuple(tokens.audio_clip_tokens(n, self.audio_cfg) for n in sizes)

    def _patch_budget(self, key: str, member: str) -> int:
        """Per-video target patch count per frame: the layout's rule
        (:meth:`~omni_train.data.layouts.DataLayout.video_patch_budget`)."""
        return self.layout.video_patch_budget(
            self.vision.video_patch_budgets,
            training=self.training,
            seed=self.seed,
            key=key,
            member=member,
        )

    # -- per micro-batch -------------------------------------------------------------------

    def pack_selected_samples(self, samples: list[OmniSample]) -> PackedSample:
        """One bin's decoded samples -> one THD sequence (see :class:`PackedSample`). Each
        sample is padded to ``sample_pad_multiple`` (context parallel splits every sample), the
        whole to ``pad_multiple`` (sequence parallel), or to exactly ``context_length`` with
        ``packing.pad_to_capacity``; an empty bin (every sample of it failed to decode) becomes
        one all-padding segment, so the rank still takes its step."""
        q, m = self.sample_pad_multiple, self.pad_multiple
        fixed = self.packing is not None and self.packing.pad_to_capacity
        toks, labels, mask, pos, media = [], [], [], [], Media()
        cu, cu_padded = [0], [0]
        for k, smp in enumerate(samples):
            n = smp.tokens.shape[0]
            pad = -n % q
            toks += [smp.tokens, smp.tokens.new_full((pad,), self.pad_id)]
            labels += [smp.labels, smp.labels.new_full((pad,), self.pad_id)]
            mask += [smp.loss_mask, smp.loss_mask.new_zeros(pad)]
            pos.append(torch.arange(n + pad, dtype=torch.int64))
            cu.append(cu_padded[-1] + n)
            cu_padded.append(cu_padded[-1] + n + pad)
            _add_media(media, smp, k)
        if fixed:
            tail = self.context_length - cu_padded[-1]
        else:
            tail = -cu_padded[-1] % m if samples else max(m, q)
        if tail:
            toks.append(torch.full((tail,), self.pad_id, dtype=torch.int64))
            labels.append(torch.full((tail,), self.pad_id, dtype=torch.int64))
            mask.append(torch.zeros(tail, dtype=torch.float32))
            start = pos[-1].shape[0] if samples else 0
            pos.append(torch.arange(start, start + tail, dtype=torch.int64))
            if not samples:
                cu.append(tail)  # one padding "sample" without loss
                cu_padded.append(tail)
            else:
                cu_padded[-1] += tail
        media.sample_names = [s.__key__ for s in samples]
        return PackedSample(
            __key__="+".join(s.__key__ for s in samples),
            __restore_key__=(),
            __subflavors__={},
            tokens=torch.cat(toks),
            labels=torch.cat(labels),
            loss_mask=torch.cat(mask),
            position_ids=torch.cat(pos),
            cu_seqlens=torch.tensor(cu, dtype=torch.int32),
            cu_seqlens_padded=torch.tensor(cu_padded, dtype=torch.int32),
            media=media,
            keys=[s.__key__ for s in samples],
            categories=[s.category for s in samples],
            num_real_tokens=sum(s.tokens.shape[0] for s in samples),
        )

    def _bookkeeping(self) -> tuple[dict, int]:
        skipped, self._skipped = dict(self._skipped), Counter()
        num_read, self._num_read = self._num_read, 0
        return skipped, num_read

    def batch(self, samples: list[OmniSample] | list[PackedSample]) -> OmniBatch:
        if isinstance(samples[0], PackedSample):
            (p,) = samples  # one packed sequence per micro-batch
            skipped, num_read = self._bookkeeping()
            return OmniBatch.from_samples(
                samples,
                tokens=p.tokens[None],
                labels=p.labels[None],
                loss_mask=p.loss_mask[None],
                position_ids=p.position_ids[None],
                media=p.media,
                keys=p.keys,
                categories=p.categories,
                num_real_tokens=p.num_real_tokens,
                skipped=skipped,
                num_read=num_read,
                cu_seqlens=p.cu_seqlens,
                cu_seqlens_padded=p.cu_seqlens_padded,
            )
        lengths = [s.tokens.shape[0] for s in samples]
        s_max = -(-max(lengths) // self.pad_multiple) * self.pad_multiple
        b = len(samples)
        toks = torch.full((b, s_max), self.pad_id, dtype=torch.int64)
        labels = torch.full((b, s_max), self.pad_id, dtype=torch.int64)
        mask = torch.zeros(b, s_max, dtype=torch.float32)
        media = Media(sample_names=[s.__key__ for s in samples])
        for row, (smp, n) in enumerate(zip(samples, lengths, strict=True)):
            toks[row, :n], labels[row, :n], mask[row, :n] = smp.tokens, smp.labels, smp.loss_mask
            _add_media(media, smp, row)
        skipped, num_read = self._bookkeeping()
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
            cu_seqlens=None,
            cu_seqlens_padded=None,
        )

    def encode_batch(self, batch: OmniBatch) -> OmniBatch:
        return batch

    # -- packing ---------------------------------------------------------------------------

    def packed_length(self, sample: PlannedSample) -> int:
        """Tokens a planned sample takes in a bin (its per-sample padding included)."""
        return -(-sample.num_tokens // self.sample_pad_multiple) * self.sample_pad_multiple

    def cost(self, sample: PlannedSample) -> float:
        return sample_cost(
            sample.num_tokens, sample.vision_tokens, sample.audio_tokens, self.cost_weights
        )

    def build_batch(self, dataset, *, batch_size, batch_drop_last=False, worker_config, **kw):
        """Unpacked: energon's (decode, then batch). Packed: the online packer, then one packed
        sequence per micro-batch."""
        if self.packing is None:
            return super().build_batch(
                dataset,
                batch_size=batch_size,
                batch_drop_last=batch_drop_last,
                worker_config=worker_config,
                **kw,
            )
        return BatchDataset(
            OnlinePackingDataset(dataset, encoder=self, worker_config=worker_config),
            batch_size=1,
            batcher=self.batch,
            batcher_stateless=False,  # batch() hands over the skip counts
            worker_config=worker_config,
        )


def _add_media(media: Media, sample: OmniSample, owner: int) -> None:
    media.vision_kinds += sample.vision_kinds
    for items, owners, new in (
        (media.images, media.image_sample, sample.images),
        (media.videos, media.video_sample, sample.videos),
        (media.audio, media.audio_sample, sample.audio),
    ):
        items += new
        owners += [owner] * len(new)
