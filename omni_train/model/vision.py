"""The RADIO vision encoder: megatron-core's ``RADIOViTModel`` extended for omni training.

megatron-core's class already has what a RADIO checkpoint holds — the patch embedder, the
cropped position embedding (CPE) grid for up to ``max_image_size`` px, class/register tokens and
the ViT blocks — but runs one batch of equally sized images. :class:`RadioEncoder` keeps its
parameters and pos-embedding code and adds, without forking it:

- dynamic resolution: a list of images of different sizes is patchified per image and run
  through the ViT blocks as one packed (THD) sequence with per-image attention boundaries;
- a Conv3D tubelet embedder for video (``tubelet_frames`` frames x 16 x 16 px per patch; an odd
  last frame is duplicated), feeding the same ViT blocks;
- the 2x2 pixel shuffle (space-to-depth) after the ViT: 4x fewer tokens, 4x the channels;
- ``cpe_eval``: the CPE's training-time random crop can be switched off while the rest trains;
- the released model's choices where they differ from megatron-core (``VisionConfig``): the CPE
  grid resized with ``align_corners=False`` (megatron: True) and no learned ``ln_post`` after
  the last block (megatron adds one when asked; the release has none).

The tubelet embedder is a linear layer over ``(t, c, 16, 16)`` patches, which is exactly a
Conv3d with kernel = stride = (t, 16, 16) (megatron's 2D embedder is the same linear form of a
Conv2d). It starts as the image embedder inflated over time (each frame's slice = weight / t),
so a static video initially embeds like the image; pretrained RADIO has no video embedder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.models.vision.radio import RADIOViTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from omni_train.config.model import VisionConfig


def pixel_shuffle(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """2x2 space-to-depth of one image's patch features.

    ``x``: ``[rows*cols, c]`` in row-major patch order -> ``[(rows/2)*(cols/2), 4c]``. For a
    square grid it equals megatron's ``llava_model.pixel_shuffle(version=2)`` (the layout
    published checkpoints were trained with); this form also takes rectangular grids.
    """
    c = x.shape[-1]
    x = x.reshape(1, rows, cols // 2, 2 * c)
    x = x.permute(0, 2, 1, 3).reshape(1, cols // 2, rows // 2, 4 * c)
    return x.permute(0, 2, 1, 3).reshape((rows // 2) * (cols // 2), 4 * c)


def patchify(pixels: torch.Tensor, patch: int) -> tuple[torch.Tensor, int, int]:
    """``pixels`` ``[t, 3, H, W]`` (t frames fused into one tubelet) -> ``[rows*cols, t*3*p*p]``
    in row-major patch order, plus (rows, cols). H and W must be multiples of ``2*patch``."""
    t, c, h, w = pixels.shape
    if h % (2 * patch) or w % (2 * patch):
        raise ValueError(
            f"image of {w}x{h} px: width and height must be multiples of {2 * patch} (an even "
            f"grid of {patch} px patches for the 2x2 pixel shuffle); resize it in the data "
            "pipeline (omni_train.data.tokens.image_grid)"
        )
    rows, cols = h // patch, w // patch
    x = pixels.reshape(t, c, rows, patch, cols, patch).permute(2, 4, 0, 1, 3, 5)
    return x.reshape(rows * cols, t * c * patch * patch), rows, cols


class RadioEncoder(RADIOViTModel):
    """RADIO ViT over a packed list of images and video tubelets.

    Its ``cpe`` part (RADIO's patch generator: the patch and tubelet embedders, the
    position-embedding grid and the class/register tokens) can run in eval mode while it trains
    (``cpe_eval``): the only train/eval difference in those layers is the random crop.
    """

    def __init__(
        self,
        config: TransformerConfig,
        vision: VisionConfig,
        layer_spec: ModuleSpec,
        norm_impl: type,
        pg_collection=None,
    ):
        p = vision.patch_size
        super().__init__(
            config,
            layer_spec,
            ln_pre_impl=None,
            ln_post_impl=norm_impl if vision.final_layernorm else None,
            add_class_token=vision.num_class_tokens > 0,
            class_token_len=max(vision.num_class_tokens, 1),
            patch_dim=p,
            img_h=32 * p,
            img_w=32 * p,
            max_img_h=vision.max_image_size,
            max_img_w=vision.max_image_size,
            has_cpe=True,
            embedder_bias=False,
            pg_collection=pg_collection,
        )
        self.num_class_tokens = vision.num_class_tokens
        self.tubelet_frames = vision.tubelet_frames
        self.cpe_eval = False
        self.cpe_align_corners = vision.cpe_align_corners
        self.video_embedder = None
        if self.tubelet_frames > 1:
            self.video_embedder = ColumnParallelLinear(
                input_size=self.tubelet_frames * 3 * p * p,
                output_size=self.visual_hidden_size,
                bias=False,
                config=config,
                gather_output=True,
                init_method=lambda tensor: torch.nn.init.normal_(tensor, mean=0.0, std=1.0),
            )
            with torch.no_grad():
                inflated = self.embedder.weight.repeat(1, self.tubelet_frames)
                self.video_embedder.weight.copy_(inflated / self.tubelet_frames)

    def _get_pos_embeddings(
        self, batch_size: int, input_dims: tuple[int, int], draw: tuple | None = None
    ) -> torch.Tensor:
        """The CPE grid ``[1, R*C, h]`` resized to ``input_dims`` (rows, cols): ``[b, r*c, h]``.

        megatron-core's ``RADIOViTModel._get_pos_embeddings`` (same random draws, same crop)
        with the interpolation convention as an option: ``align_corners=False`` is the released
        model's (transformers ``RadioPatchEmbeddings._interpolate_position_embedding``: resize to
        a square of the longer side, keep the top-left window). In training the random crop
        samples pixel centres under ``align_corners=False`` (``(i + 0.5) / n``), so a full-size
        crop equals the eval-time resize, as megatron's ``linspace(0, 1)`` grid does under True.
        ``cpe_eval`` turns the crop off while the encoder trains. ``draw``: the crop's random
        numbers drawn beforehand (:meth:`draw_crops`); None draws them here.
        """
        rows, cols = self.max_num_rows, self.max_num_cols
        if (rows, cols) == tuple(input_dims):
            return self.position_embeddings
        corners = self.cpe_align_corners
        pos = self.position_embeddings.reshape(1, rows, cols, -1).permute(0, 3, 1, 2)
        if self.training and not self.cpe_eval:
            pos = self._random_crop(pos, batch_size, input_dims, corners, draw)
        else:
            side = max(input_dims)
            pos = F.interpolate(
                pos.float(), size=(side, side), mode="bilinear", align_corners=corners
            ).to(pos.dtype)
            pos = pos[..., : input_dims[0], : input_dims[1]]
        if tuple(pos.shape[-2:]) != tuple(input_dims):
            pos = F.interpolate(
                pos.float(), size=tuple(input_dims), mode="bilinear", align_corners=corners
            ).to(pos.dtype)
        return pos.flatten(2).permute(0, 2, 1)

    def _crops_random(self, input_dims: tuple[int, int]) -> bool:
        """Whether the CPE of a grid of ``input_dims`` draws a random crop now."""
        full = (self.max_num_rows, self.max_num_cols) == tuple(input_dims)
        return self.training and not self.cpe_eval and not full

    @staticmethod
    def _crop_draw(batch_size: int, device) -> tuple[torch.Tensor, ...]:
        """The uniform numbers one random crop consumes (scale, aspect, position), in the
        order RADIO draws them."""
        return (
            torch.rand(batch_size, 1, 1, device=device),
            torch.rand(batch_size, 1, 1, device=device),
            torch.rand(batch_size, 1, 1, 2, device=device),
        )

    def draw_crops(self, pieces: list[torch.Tensor]) -> list[tuple | None]:
        """The CPE crop draws of ``pieces`` (``[t, 3, H, W]`` each), in list order: what
        :meth:`encode_pieces` would draw one piece at a time. Drawing them for every piece of a
        micro-batch, on every rank, and using only one's own keeps the random stream, and so
        each piece's crop, equal to one process's however the pieces are shared out."""
        p = self.patch_dim
        device = self.position_embeddings.device
        return [
            self._crop_draw(1, device)
            if self._crops_random((x.shape[-2] // p, x.shape[-1] // p))
            else None
            for x in pieces
        ]

    @staticmethod
    def _random_crop(
        pos: torch.Tensor,
        batch_size: int,
        input_dims: tuple[int, int],
        corners: bool,
        draw: tuple | None = None,
    ) -> torch.Tensor:
        """RADIO's training-time CPE: a random window (area 10-100 %, aspect 3/4-4/3) of the
        grid ``pos`` ``[1, h, R, C]`` sampled at ``input_dims`` points -> ``[b, h, r, c]``."""
        device = pos.device
        u_scale, u_aspect, u_pos = draw or RadioEncoder._crop_draw(batch_size, device)
        min_scale = math.sqrt(0.1)
        scale = u_scale * (1 - min_scale) + min_scale
        aspect_min = math.log(3 / 4)
        aspect = torch.exp(u_aspect * (-2 * aspect_min) + aspect_min)
        scale_xy = torch.stack([scale * aspect, scale / aspect], dim=-1).clamp_(0, 1)
        pos_xy = u_pos * (1 - scale_xy)

        def axis(n: int) -> torch.Tensor:
            if corners:
                return torch.linspace(0, 1, steps=n, device=device)
            return (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n

        lin_x = axis(input_dims[1])[None, None].expand(batch_size, input_dims[0], -1)
        lin_y = axis(input_dims[0])[None, :, None].expand(batch_size, -1, input_dims[1])
        grid = (torch.stack([lin_x, lin_y], dim=-1) * scale_xy + pos_xy) * 2 - 1
        return F.grid_sample(
            pos.float().expand(batch_size, -1, -1, -1),
            grid=grid,
            mode="bilinear",
            padding_mode="zeros",
            align_corners=corners,
        ).to(pos.dtype)

    def _embed(self, pixels: torch.Tensor, draw: tuple | None) -> tuple[torch.Tensor, int, int]:
        """One image ``[1, 3, H, W]`` or tubelet ``[t, 3, H, W]`` -> ``[cls + rows*cols, h]``."""
        patches, rows, cols = patchify(pixels, self.patch_dim)
        embedder = self.embedder if pixels.shape[0] == 1 else self.video_embedder
        x, _ = embedder(patches.to(self.class_token.dtype).unsqueeze(0))  # [1, n, h]
        x = x + self._get_pos_embeddings(1, (rows, cols), draw)
        if self.add_class_token and self.num_class_tokens:
            x = torch.cat([self.class_token.unsqueeze(0), x], dim=1)
        return x[0], rows, cols

    def tubelets(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """``frames`` ``[F, 3, H, W]`` -> groups ``[t, 3, H, W]`` (odd last frame duplicated)."""
        t = self.tubelet_frames
        if t == 1:
            return [f.unsqueeze(0) for f in frames]
        if frames.shape[0] % t:
            pad = frames[-1:].expand(t - frames.shape[0] % t, -1, -1, -1)
            frames = torch.cat([frames, pad])
        return list(frames.reshape(-1, t, *frames.shape[1:]))

    def pieces(
        self, images: list[torch.Tensor], videos: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[int]]:
        """The ViT's inputs: every image ``[1, 3, H, W]`` then every video's tubelets
        ``[t, 3, H, W]``, and the item each belongs to (images first, then videos)."""
        pieces = [img.unsqueeze(0) for img in images]
        owners = list(range(len(images)))
        for j, video in enumerate(videos):
            groups = self.tubelets(video)
            pieces += groups
            owners += [len(images) + j] * len(groups)
        return pieces, owners

    def piece_tokens(self, piece: torch.Tensor) -> int:
        """ViT sequence length of one piece (patches and class tokens): its encoding cost."""
        p = self.patch_dim
        return (piece.shape[-2] // p) * (piece.shape[-1] // p) + self.num_class_tokens

    def encode_pieces(
        self, pieces: list[torch.Tensor], draws: list[tuple | None]
    ) -> list[torch.Tensor]:
        """Pieces ``[t, 3, H, W]`` (normalised pixels) with their CPE crop draws -> per-piece
        features ``[rows*cols/4, 4*h]`` after the pixel shuffle (class tokens dropped).

        Everything runs as one packed sequence: each piece is one attention segment, so a
        piece's features do not depend on the other pieces of the pass.
        """
        if not pieces:
            return []
        embedded = [self._embed(p, d) for p, d in zip(pieces, draws, strict=True)]
        lengths = [x.shape[0] for x, _, _ in embedded]
        x = torch.cat([x for x, _, _ in embedded]).unsqueeze(1)  # [T, 1, h]
        cu = torch.tensor([0, *lengths], device=x.device).cumsum(0).to(torch.int32)
        packed = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            max_seqlen_q=max(lengths),
            max_seqlen_kv=max(lengths),
        )
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        x = self.decoder(x, attention_mask=None, packed_seq_params=packed)
        if self.ln_post is not None:
            x = self.ln_post(x)
        x = x.squeeze(1)
        out, start = [], 0
        for (_, rows, cols), n in zip(embedded, lengths, strict=True):
            out.append(pixel_shuffle(x[start + self.num_class_tokens : start + n], rows, cols))
            start += n
        return out

    def encode(
        self, images: list[torch.Tensor], videos: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Images ``[3, H_i, W_i]`` and videos ``[F_j, 3, H_j, W_j]`` (normalised pixels) ->
        per-item features ``[tokens_i, 4*h]`` after the pixel shuffle (class tokens dropped),
        all pieces in one packed pass (:meth:`encode_pieces`)."""
        pieces, owners = self.pieces(images, videos)
        feats = self.encode_pieces(pieces, self.draw_crops(pieces))
        per_item: list[list[torch.Tensor]] = [[] for _ in range(len(images) + len(videos))]
        for owner, f in zip(owners, feats, strict=True):
            per_item[owner].append(f)
        out = [torch.cat(parts) for parts in per_item]
        return out[: len(images)], out[len(images) :]
