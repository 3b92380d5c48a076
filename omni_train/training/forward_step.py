"""The forward step: the one place that knows what a batch holds and how loss is computed.

Loss convention (megatron ``calculate_per_token_loss``): the step returns the *sum* of token
losses and the number of loss tokens; megatron adds both up over micro-batches and data-parallel
ranks and divides gradients by the global token count. Padding and masked tokens never count.

Besides the loss, each micro-batch reports (for the metrics, never for gradients) its loss per
modality of sample (text only, image, video, audio, audio+video, mixed: from the media each
sample owns) and its model and hardware FLOPs (``omni_train.training.flops``), counted under the
stage's :class:`~omni_train.training.flops.FlopsPolicy`, which :func:`make_forward_step` binds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import partial

import torch

from omni_train.config.model import ModelConfig
from omni_train.data import tokens
from omni_train.data.media import Media
from omni_train.data.microbatch import MicroBatch
from omni_train.model.omni import sample_index
from omni_train.parallel.context import shard_index
from omni_train.training import flops
from omni_train.training.metrics import MODALITIES


def sample_modalities(media: Media | None, num_samples: int) -> list[int]:
    """Index into ``MODALITIES`` of every sample (row or packed segment)."""
    out = []
    media = media or Media()
    for i in range(num_samples):
        image, video, audio = (i in media.image_sample, i in media.video_sample,
                               i in media.audio_sample)  # fmt: skip
        if image and (video or audio):
            name = "mixed"
        elif video and audio:
            name = "audio+video"
        else:
            name = "image" if image else "video" if video else "audio" if audio else "text"
        out.append(MODALITIES.index(name))
    return out


def batch_geometry(batch: MicroBatch, model_cfg) -> flops.Geometry:
    """What the FLOPs count needs of a micro-batch: LM segment lengths (real tokens of each
    packed sample; an unpacked row counts its padded length), ViT pieces, audio clips."""
    packed = batch.packed_seq_params
    b, s = batch.tokens.shape
    if packed is not None:
        cu = packed.cu_seqlens_q.tolist()
        lengths = [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]
    else:
        lengths = [s] * b
    media = batch.media
    pieces, vision_features = [], 0
    v, a = model_cfg.vision, model_cfg.audio
    if v is not None:
        p = v.patch_size
        for img in media.images:
            rows, cols = img.shape[-2] // p, img.shape[-1] // p
            pieces.append((rows * cols, 1))
            vision_features += tokens.grid_tokens(rows, cols)
        for video in media.videos:
            rows, cols = video.shape[-2] // p, video.shape[-1] // p
            groups = tokens.video_groups(video.shape[0], v.tubelet_frames > 1, v.tubelet_frames)
            pieces += [(rows * cols, v.tubelet_frames)] * groups
            vision_features += groups * tokens.grid_tokens(rows, cols)
    frames, audio_features = [], 0
    if a is not None:
        for clip in media.audio:  # each item is one encoder input
            frames.append(clip.shape[0] // a.hop_samples + 1)  # centred STFT frames
            audio_features += tokens.audio_clip_tokens(clip.shape[0], a)
    return flops.Geometry(lengths, pieces, vision_features, frames, audio_features)


def loss_func(
    loss_mask: torch.Tensor,
    token_modality: torch.Tensor,
    step_flops: flops.StepFlops,
    output_tensor: torch.Tensor,
):
    """output_tensor: per-token losses [b, s]; loss_mask: [b, s] (1 = counts);
    token_modality: [b, s] index into MODALITIES of each token's sample."""
    mask = loss_mask.reshape(-1).float()
    losses = output_tensor.reshape(-1).float().detach() * mask
    loss_sum = torch.sum(output_tensor.reshape(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    # Reported as (sum, count) so the logger can average over micro-batches and ranks exactly.
    report = torch.stack([loss_sum.detach(), num_tokens.float()])
    index = token_modality.reshape(-1).to(losses.device)
    per_modality = torch.zeros(len(MODALITIES), 2, dtype=torch.float32, device=losses.device)
    per_modality[:, 0].index_add_(0, index, losses)
    per_modality[:, 1].index_add_(0, index, mask)
    work = torch.tensor([step_flops.model, step_flops.hardware], dtype=torch.float64)
    return loss_sum, num_tokens, {"lm loss": report, "modality loss": per_modality, "flops": work}


ForwardStep = Callable[[Iterator[MicroBatch], torch.nn.Module], tuple[torch.Tensor, Callable]]


def make_forward_step(model_cfg: ModelConfig, policy: flops.FlopsPolicy) -> ForwardStep:
    """The forward step megatron's schedule calls as ``(data_iterator, model)``, for a model of
    ``model_cfg`` whose FLOPs are counted under ``policy``."""
    return partial(forward_step, model_cfg=model_cfg, policy=policy)


def forward_step(
    data_iterator: Iterator[MicroBatch],
    model: torch.nn.Module,
    *,
    model_cfg: ModelConfig,
    policy: flops.FlopsPolicy,
):
    """Context parallel: every CP rank gets the whole micro-batch; the model embeds it and keeps
    this rank's positions, so labels and loss mask are cut to the same positions here. Returns
    the per-token losses ``[b, s/cp]`` and the loss function megatron applies to them."""
    batch: MicroBatch = next(data_iterator)
    packed = batch.packed_seq_params
    labels, loss_mask = batch.labels, batch.loss_mask
    where = sample_index(batch.tokens, packed)
    num_samples = int(where.max()) + 1 if where.numel() else 0
    table = torch.tensor(sample_modalities(batch.media, num_samples), dtype=torch.long)
    token_modality = table.to(where.device)[where]
    cp_index = shard_index(labels.shape[1], packed)
    if cp_index is not None:
        cp_index = cp_index.to(labels.device)
        labels, loss_mask = (x.index_select(1, cp_index) for x in (labels, loss_mask))
        token_modality = token_modality.index_select(1, cp_index)
    work = policy.count(model_cfg, batch_geometry(batch, model_cfg))
    if not math.isfinite(work.model):
        raise ValueError("non-finite FLOPs count")
    output = model(
        input_ids=batch.tokens,
        position_ids=batch.position_ids,  # unused: Nemotron-H has no position embedding
        attention_mask=None,  # causal masking is built into the attention layers
        labels=labels,
        media=batch.media,
        packed_seq_params=packed,
        cp_index=cp_index,
    )
    return output, partial(loss_func, loss_mask, token_modality, work)
