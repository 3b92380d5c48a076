"""OmniModel: text embeddings with media features spliced in, through the hybrid LM.

Data flow per micro-batch::

    input_ids [b, s] --(CP: this rank's positions)--LM embedding--> [b, s/cp, h]
    images/videos --RADIO (one packed ViT pass)--> pixel shuffle --vision projector--+
    audio clips --mel--> FastConformer ------------------------------audio projector-+--> replace
    the placeholder tokens in place --(SP: scatter)--> MambaStack
    --> per-token loss [b, s] ([b, s/cp] under context parallel)

Under context and tensor parallelism the encoders are sharded, not replicated: each rank of the
CP group (vision) or the TP x CP group (audio) encodes its share of the media items, and an
all-to-all brings every feature row to the rank whose positions hold it
(``omni_train.parallel.encoder_shard``); with one process everything is local.

Each encoder runs only on the media present. A trainable encoder or projector whose modality
is absent still gets an all-zero gradient (a zero-weighted term), so every DDP bucket fills and
the optimizer sees the same parameter set on every rank and step; no encoder compute is spent.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as mpu
from megatron.core import tensor_parallel
from megatron.core.models.mamba import MambaModel
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from omni_train.config import ModelConfig
from omni_train.data import tokens
from omni_train.data.media import Media
from omni_train.model.audio import GroupBatchNorm1d
from omni_train.model.recompute import recomputed
from omni_train.parallel.context import padded_bounds
from omni_train.parallel.encoder_shard import (
    EncoderGroup,
    assign,
    build_route,
    encoder_groups,
    exchange_rows,
)
from omni_train.platform.kernels.attention import segment_ids  # pure PyTorch, any device
from omni_train.platform.kernels.cp_layout import position_owner

COMPONENTS = ("llm", "vision_encoder", "vision_projector", "audio_encoder", "audio_projector")
# Named parts a stage may run in eval mode while they train (the CPE's random crop off).
PARTS = ("vision_encoder.cpe",)
# Components whose train mode changes what they compute (CPE crop; dropout and BatchNorm
# statistics): frozen, they run in eval mode. The LM and the projectors have no such layers
# (dropout 0, no BatchNorm) and stay in train mode when frozen, because megatron-core only
# recomputes activations in train mode and the gradient of a frozen LM's input still needs them.
EVAL_WHEN_FROZEN = ("vision_encoder", "audio_encoder")


def sample_index(input_ids: torch.Tensor, packed: PackedSeqParams | None) -> torch.Tensor:
    """``[b, s]``: which sample each token belongs to (row, or packed segment)."""
    b, s = input_ids.shape
    if packed is None:
        return torch.arange(b, device=input_ids.device)[:, None].expand(b, s)
    cu = packed.cu_seqlens_q_padded
    if cu is None:
        cu = packed.cu_seqlens_q
    return segment_ids(cu, s).unsqueeze(0)


class OmniModel(MegatronModule):
    """The omni model. Children are the declared components (absent encoders are ``None``)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        llm: MambaModel,
        vision_encoder=None,
        vision_projector: MultimodalProjector | None = None,
        audio_encoder=None,
        audio_projector: MultimodalProjector | None = None,
    ):
        super().__init__(config=llm.config)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        self.cfg = model_cfg
        self.llm = llm
        self.vision_encoder = vision_encoder
        self.vision_projector = vision_projector
        self.audio_encoder = audio_encoder
        self.audio_projector = audio_projector
        if audio_encoder is not None:
            # shared out over TP ranks (not tensor parallel): omni_train.training.optimizer
            # sums these gradients over TP
            for p in audio_encoder.parameters():
                p.partial_over_tp = True
        self.recompute_projectors = False  # omni_train.model.recompute.apply_recompute

    # ---- components -------------------------------------------------------------------------

    def components(self) -> dict[str, torch.nn.Module]:
        return {n: getattr(self, n) for n in COMPONENTS if getattr(self, n) is not None}

    def set_eval_parts(self, parts: list[str]) -> None:
        """Run the named parts in eval mode (e.g. ``vision_encoder.cpe``) even while training."""
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            raise ValueError(f"unknown model parts {unknown}; this model declares {list(PARTS)}")
        if self.vision_encoder is not None:
            self.vision_encoder.cpe_eval = "vision_encoder.cpe" in parts

    def set_mode_policy(self, eval_components: list[str], eval_parts: list[str]) -> None:
        """Which components (whole) and parts stay in eval mode when the model trains; applied
        by every later ``train()`` call, so the training loop stays generic."""
        unknown = sorted(set(eval_components) - set(self.components()))
        if unknown:
            raise ValueError(
                f"unknown components {unknown}; this model declares {list(self.components())}"
            )
        self._eval_components = list(eval_components)
        self.set_eval_parts(eval_parts)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for name in getattr(self, "_eval_components", ()):
                getattr(self, name).eval()
        return self

    def set_input_tensor(self, input_tensor) -> None:
        self.llm.set_input_tensor(input_tensor)

    # ---- forward ----------------------------------------------------------------------------

    def _check_counts(
        self,
        modality: str,
        token_id: int,
        owners: list[int],
        expected: list[int],
        ids,
        where,
        media,
    ) -> torch.Tensor:
        """Placeholder count per sample must equal the features its media items yield."""
        mask = ids == token_id
        num_samples = int(where.max()) + 1 if where.numel() else 0
        have = torch.bincount(where[mask], minlength=num_samples).tolist()
        want = [0] * max(num_samples, max(owners, default=-1) + 1)
        for owner, n in zip(owners, expected, strict=True):
            want[owner] += n
        have += [0] * (len(want) - len(have))
        for sample, (h, w) in enumerate(zip(have, want, strict=True)):
            if h != w:
                raise ValueError(
                    f"{media.name(sample)}: {h} {modality} placeholder tokens (id {token_id}) "
                    f"but its {modality} items yield {w} features; the token stream and the "
                    "media disagree (see omni_train.data.tokens)"
                )
        return mask

    def _vision_features(
        self, media: Media, ids, where, dest: torch.Tensor | None, g: EncoderGroup
    ) -> torch.Tensor:
        """Images and videos fill the image placeholders together, in token order (the
        released layout: video frame groups use the image placeholder). Returns the projected
        rows ``[n, h]`` of this rank's placeholders (all of them without CP), in token order.

        ``dest`` ``[n_all]``: the CP rank of every placeholder (None without CP). Under CP the
        pieces (images, tubelets) are shared out by ViT length over the CP group ``g``."""
        enc, p = self.vision_encoder, self.cfg.vision.patch_size
        img_n = [tokens.grid_tokens(x.shape[-2] // p, x.shape[-1] // p) for x in media.images]
        vid_n = [
            tokens.video_groups(v.shape[0], enc.tubelet_frames > 1, enc.tubelet_frames)
            * tokens.grid_tokens(v.shape[-2] // p, v.shape[-1] // p)
            for v in media.videos
        ]
        order = media.vision_items()
        counts = [(img_n if kind == "image" else vid_n)[i] for kind, i, _ in order]
        owners = [owner for _, _, owner in order]
        self._check_counts(
            "image/video", self.cfg.media_tokens.image, owners, counts, ids, where, media
        )
        # every piece in the encoder's order (images, then the videos' tubelets), with its CPE
        # crop drawn on every rank: the random stream is one process's however pieces are shared
        pieces, item = enc.pieces(media.images, media.videos)
        draws = enc.draw_crops(pieces)
        rows = [tokens.grid_tokens(x.shape[-2] // p, x.shape[-1] // p) for x in pieces]
        # feature rows follow token order: the items as vision_items lists them, pieces in turn
        by_item: list[list[int]] = [[] for _ in range(len(media.images) + len(media.videos))]
        for k, it in enumerate(item):
            by_item[it].append(k)
        first_video = len(media.images)
        token_order = [
            k for kind, i, _ in order for k in by_item[i if kind == "image" else first_video + i]
        ]
        if sum(rows) != sum(counts):
            raise RuntimeError(
                f"the ViT's pieces yield {sum(rows)} features but token accounting expects "
                f"{sum(counts)}; omni_train.data.tokens is out of step with RadioEncoder.pieces"
            )
        owner = (
            [0] * len(pieces)
            if g.size == 1
            else assign([enc.piece_tokens(x) for x in pieces], g.size)
        )
        picked = [k for k in token_order if owner[k] == g.rank]
        feats = enc.encode_pieces([pieces[k] for k in picked], [draws[k] for k in picked])
        _assert_counts(feats, [rows[k] for k in picked], "vision")
        if feats:
            local = self._project(self.vision_projector, torch.cat(feats))
        else:
            local = self._empty_rows(self.vision_projector, self.cfg.hidden_size)
        if g.size == 1:
            return local
        local = _anchored(local, [self.vision_encoder, self.vision_projector])
        row_owner = torch.tensor([owner[k] for k in token_order]).repeat_interleave(
            torch.tensor([rows[k] for k in token_order])
        )
        return exchange_rows(local, build_route(row_owner, dest, g), g)

    def _audio_features(
        self, media: Media, ids, where, dest: torch.Tensor | None, g: EncoderGroup
    ) -> torch.Tensor:
        """Every audio item is one encoder input; a sample's items fill its audio placeholders
        in order. Returns the projected rows ``[n, h]`` of this rank's placeholders.

        Under TP or CP the clips are shared out over the TP x CP group ``g`` by count (each is
        padded to the micro-batch's longest, as one process pads them, so each costs the same);
        the conformer's rows are exchanged and the projector runs where they land. The mel
        front end runs on every clip on every rank (cheap), so its dither is one process's."""
        counts = [tokens.audio_clip_tokens(a.shape[0], self.cfg.audio) for a in media.audio]
        t = self.cfg.media_tokens
        self._check_counts("audio", t.audio, media.audio_sample, counts, ids, where, media)
        enc = self.audio_encoder
        mels, lengths = enc.features(media.audio)  # [clips, frames, mels], padded to the longest
        owner = [0] * len(counts) if g.size == 1 else assign([mels.shape[1]] * len(counts), g.size)
        mine = [k for k in range(len(counts)) if owner[k] == g.rank]
        group = g.group if g.size > 1 else None
        if mine:
            if len(mine) < len(counts):
                mels, lengths = mels[mine], lengths[mine]
            out = enc.encode(mels, lengths, group)
            local = torch.cat([out[j, : counts[k]] for j, k in enumerate(mine)])
        elif enc.training and any(isinstance(m, GroupBatchNorm1d) for m in enc.modules()):
            # no clip here: a placeholder clip of weight 0 takes part in the BatchNorm
            # collectives of the ranks that have clips, and yields no rows
            out = enc.encode(mels[:1], lengths[:1], group, mels.new_zeros(1))
            local = out[0, :0]
        else:
            local = self._empty_rows(enc.encoder, self.cfg.audio.d_model)
        _assert_counts([local], [sum(counts[k] for k in mine)], "audio")
        if g.size > 1:
            local = _anchored(local, [enc])
            row_owner = torch.tensor(owner).repeat_interleave(torch.tensor(counts))
            local = exchange_rows(local, build_route(row_owner, dest, g), g)
        return self._project(self.audio_projector, local)

    @staticmethod
    def _empty_rows(module: torch.nn.Module, width: int) -> torch.Tensor:
        return next(module.parameters()).new_zeros(0, width)

    def embed(
        self,
        input_ids: torch.Tensor,
        media: Media | None,
        packed: PackedSeqParams | None,
        cp_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``input_ids`` ``[b, s]`` -> decoder input ``[s, b, h]``: ``[s/cp, b, h]`` (the
        positions ``cp_index``, increasing) under context parallel, then ``/tp`` under SP.
        ``media`` is the whole micro-batch's; under TP / CP each rank encodes its share of it
        (module docstring)."""
        vision_g, audio_g = encoder_groups(context_sharded=cp_index is not None)
        local_ids = input_ids if cp_index is None else input_ids.index_select(1, cp_index)
        emb = self.llm.embedding(input_ids=local_ids, position_ids=None).transpose(0, 1)
        media = media or Media()
        where = sample_index(input_ids, packed)
        ids = self.cfg.media_tokens
        spliced: list[tuple[torch.Tensor, torch.Tensor]] = []
        unused = []
        owner = None  # under CP: the CP rank holding each position [s] (once per micro-batch)
        if cp_index is not None and (media.images or media.videos or media.audio):
            cp = mpu.get_context_parallel_world_size()
            owner = position_owner(input_ids.shape[1], cp, padded_bounds(packed))
        if media.images or media.videos:
            self._require("vision_encoder", "image/video")
            mask, dest = self._placeholders(input_ids, ids.image, owner, cp_index)
            spliced.append((mask, self._vision_features(media, input_ids, where, dest, vision_g)))
        else:  # no vision media: a stray placeholder is still an error
            self._check_counts("image/video", ids.image, [], [], input_ids, where, media)
            unused += [self.vision_encoder, self.vision_projector]
        if media.audio:
            self._require("audio_encoder", "audio")
            mask, dest = self._placeholders(input_ids, ids.audio, owner, cp_index)
            if dest is None and audio_g.size > 1:  # TP only: every rank needs every row
                dest = torch.zeros(int((input_ids == ids.audio).sum()), dtype=torch.int64)
            spliced.append((mask, self._audio_features(media, input_ids, where, dest, audio_g)))
        else:
            self._check_counts("audio", ids.audio, [], [], input_ids, where, media)
            unused += [self.audio_encoder, self.audio_projector]
        for mask, feats in spliced:
            emb = emb.masked_scatter(mask.unsqueeze(-1), feats.to(emb.dtype))
        zero = _zero_touch(unused)
        if zero is not None:
            emb = emb + zero.to(emb.dtype)
        emb = emb.transpose(0, 1).contiguous()  # [s, b, h]
        if self.config.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
        return emb

    @staticmethod
    def _placeholders(
        input_ids: torch.Tensor,
        token_id: int,
        owner: torch.Tensor | None,
        cp_index: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's placeholder mask ``[b, s/cp]`` and, under CP (``owner``: the CP rank of
        each position ``[s]``), the CP rank holding each of the micro-batch's placeholders
        ``[n_all]`` (row-major: the order features fill them). A shard's positions increase,
        so its placeholders keep that order."""
        mask = input_ids == token_id
        if cp_index is None:
            return mask, None
        dest = owner[mask.nonzero()[:, 1].cpu()]
        return mask.index_select(1, cp_index), dest

    def _project(self, projector: MultimodalProjector, feats: torch.Tensor) -> torch.Tensor:
        """``[n, in]`` encoder features -> ``[n, h]`` LM embeddings (recomputed if asked)."""
        x = feats.unsqueeze(1)
        out = recomputed(projector, x) if self.recompute_projectors else projector(x)
        return out.squeeze(1)

    def _require(self, component: str, modality: str) -> None:
        if getattr(self, component) is None:
            raise ValueError(
                f"the batch has {modality} media but model {self.cfg.name!r} has no {component}"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        media: Media | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        runtime_gather_output: bool | None = None,
        cp_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-token loss ``[b, s]`` if ``labels`` are given, else logits ``[b, s, V/tp]``
        (``V`` with ``runtime_gather_output``). Packed input: ``b = 1`` with
        ``packed_seq_params`` (THD, ``cu_seqlens`` over the ``s`` tokens).

        Context parallel: ``input_ids`` and ``media`` are the whole micro-batch, ``cp_index``
        (``[s/cp]``, :func:`omni_train.parallel.context.shard_index`) the positions this rank
        keeps, ``labels`` already sharded ``[b, s/cp]``; the loss is ``[b, s/cp]``."""
        decoder_input = self.embed(input_ids, media, packed_seq_params, cp_index)
        return self.llm(
            input_ids=None,
            position_ids=None,
            attention_mask=None,
            decoder_input=decoder_input,
            labels=labels,
            packed_seq_params=packed_seq_params,
            runtime_gather_output=runtime_gather_output,
        )

    def embed_generated(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Generated tokens ``[b, s]`` -> decoder input ``[s, b, h]``: the LM's embedding
        only (no media, no placeholder check; no sequence parallel in generation)."""
        return self.llm.embedding(input_ids=input_ids, position_ids=None)

    def generate_step(
        self,
        input_ids: torch.Tensor | None,
        media: Media | None,
        inference_context,
        attention_mask: torch.Tensor | None = None,
        *,
        decoder_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One forward of generation: logits ``[b, V]`` (fp32, the whole vocabulary) of the
        last position of ``input_ids`` ``[b, s]``, or of ``decoder_input`` ``[s, b, h]``
        (embeddings already made, then ``input_ids`` is ignored).

        ``media``: the prompt's (a ``Media``, empty for a text prompt) at the prefill, checked
        against its placeholders as in training. None for generated tokens: they are embedded
        as text whatever their ids, so a generated placeholder id is an ordinary token without
        media, as in transformers' ``generate`` (:meth:`embed_generated`).

        ``inference_context``: megatron-core's ``StaticInferenceContext`` (attention keys and
        values, Mamba conv and SSM states; updated in place: the caller advances its offset),
        or None to run the whole sequence without a cache. ``attention_mask``: megatron's
        convention, ``[b, 1, s, sk]`` bool, True = masked out (padding slots of a merged
        cache). Eval mode, no sequence or context parallel: megatron's static Mamba path
        asserts both off. The LM has no positional embedding, so no position ids."""
        if decoder_input is None and media is None:
            decoder_input = self.embed_generated(input_ids)
        elif decoder_input is None:
            decoder_input = self.embed(input_ids, media, None)
        logits = self.llm(
            input_ids=None,
            position_ids=None,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            inference_context=inference_context,
            runtime_gather_output=True,
        )
        return logits[:, -1].float()  # a static context materialises the last position only


def _assert_counts(feats: list[torch.Tensor], counts: list[int], what: str) -> None:
    got = [f.shape[0] for f in feats]
    if got != counts:
        raise RuntimeError(
            f"{what} encoder produced {got} features per item but token accounting expects "
            f"{counts}; omni_train.data.tokens is out of step with the encoder"
        )


def _zero_touch(modules: list[torch.nn.Module | None]) -> torch.Tensor | None:
    """A zero that depends on every trainable parameter of ``modules`` (one element each)."""
    terms = [
        p.reshape(-1)[0].float()
        for m in modules
        if m is not None
        for p in m.parameters()
        if p.requires_grad
    ]
    return torch.stack(terms).sum() * 0.0 if terms else None


def _anchored(rows: torch.Tensor, modules: list[torch.nn.Module | None]) -> torch.Tensor:
    """``rows`` tied to the trainable parameters of ``modules`` when grad is on: a rank with
    nothing to encode still enters the exchange's backward, which every rank of the group must
    run together."""
    if rows.requires_grad or not torch.is_grad_enabled():
        return rows
    zero = _zero_touch(modules)
    return rows if zero is None else rows + zero.to(rows.dtype)
