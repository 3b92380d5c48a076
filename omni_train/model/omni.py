"""OmniModel: text embeddings with media features spliced in, through the hybrid LM.

Data flow per micro-batch::

    input_ids [b, s] --LM embedding--> [b, s, h]
    images/videos --RADIO (one packed ViT pass)--> pixel shuffle --vision projector--+
    audio clips --mel--> FastConformer --audio projector-----------------------------+--> replace
    the placeholder tokens in place --(CP: keep this rank's shard)--(SP: scatter)--> MambaStack
    --> per-token loss [b, s] ([b, s/cp] under context parallel)

Each encoder runs only on the media present. A trainable encoder or projector whose modality
is absent still gets an all-zero gradient (a zero-weighted term), so every DDP bucket fills and
the optimizer sees the same parameter set on every rank and step; no encoder compute is spent.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.mamba import MambaModel
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from omni_train.config import ModelConfig
from omni_train.config.schema import RecomputeConfig
from omni_train.data import tokens
from omni_train.data.media import Media
from omni_train.model.recompute import recomputed
from omni_train.platform.kernels.attention import segment_ids  # pure PyTorch, any device

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
        self.recompute_projectors = False  # omni_train.model.recompute.apply_recompute
        # (trainable component names, RecomputeConfig): what the FLOPs count of a step needs
        # (omni_train.training.flops); set by omni_train.model.assembly.build_model
        self.flops_policy = (list(self.components()), RecomputeConfig())

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

    def _vision_features(self, media: Media, ids, where) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Images and videos fill the image placeholders together, in token order (the
        released layout: video frame groups use the image placeholder)."""
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
        mask = self._check_counts(
            "image/video", self.cfg.media_tokens.image, owners, counts, ids, where, media
        )
        images, videos = enc.encode(media.images, media.videos)
        _assert_counts(images, img_n, "vision")
        _assert_counts(videos, vid_n, "vision")
        feats = [(images if kind == "image" else videos)[i] for kind, i, _ in order]
        return [(mask, self._project(self.vision_projector, torch.cat(feats)))]

    def _audio_features(self, media: Media, ids, where) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every audio item is one encoder input; a sample's items fill its audio
        placeholders in order."""
        counts = [tokens.audio_clip_tokens(a.shape[0], self.cfg.audio) for a in media.audio]
        t = self.cfg.media_tokens
        mask = self._check_counts("audio", t.audio, media.audio_sample, counts, ids, where, media)
        feats = self.audio_encoder(media.audio)
        _assert_counts(feats, counts, "audio")
        return [(mask, self._project(self.audio_projector, torch.cat(feats)))]

    def embed(
        self,
        input_ids: torch.Tensor,
        media: Media | None,
        packed: PackedSeqParams | None,
        cp_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``input_ids`` ``[b, s]`` -> decoder input ``[s, b, h]``: ``[s/cp, b, h]`` (the
        positions ``cp_index``) under context parallel, then ``/tp`` under SP. The encoders see
        every media item of the micro-batch on every CP rank (replicated, as in megatron-core)."""
        emb = self.llm.embedding(input_ids=input_ids, position_ids=None).transpose(0, 1)
        media = media or Media()
        where = sample_index(input_ids, packed)
        ids = self.cfg.media_tokens
        spliced: list[tuple[torch.Tensor, torch.Tensor]] = []
        unused = []
        if media.images or media.videos:
            self._require("vision_encoder", "image/video")
            spliced += self._vision_features(media, input_ids, where)
        else:  # no vision media: a stray placeholder is still an error
            self._check_counts("image/video", ids.image, [], [], input_ids, where, media)
            unused += [self.vision_encoder, self.vision_projector]
        if media.audio:
            self._require("audio_encoder", "audio")
            spliced += self._audio_features(media, input_ids, where)
        else:
            self._check_counts("audio", ids.audio, [], [], input_ids, where, media)
            unused += [self.audio_encoder, self.audio_projector]
        for mask, feats in spliced:
            emb = emb.masked_scatter(mask.unsqueeze(-1), feats.to(emb.dtype))
        zero = _zero_touch(unused)
        if zero is not None:
            emb = emb + zero.to(emb.dtype)
        emb = emb.transpose(0, 1)  # [s, b, h]
        if cp_index is not None:
            emb = emb.index_select(0, cp_index)
        emb = emb.contiguous()
        if self.config.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
        return emb

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
