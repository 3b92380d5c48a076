"""Token accounting (omni_train.data.tokens): exact counts, and agreement with the real encoders'
arithmetic (NeMo's mel + dw_striding lengths; the ViT's patchify and pixel shuffle). The rules
themselves are checked against the released processor in tests/test_processor_parity.py."""

from __future__ import annotations

import pytest
import torch

from omni_train.config.model import AudioConfig
from omni_train.data import tokens
from omni_train.model.vision import patchify, pixel_shuffle


@pytest.mark.parametrize(
    ("size", "grid", "n"),
    [
        ((512, 512), (32, 32), 256),  # the minimum budget: 1,024 patches
        ((256, 256), (32, 32), 256),  # upscaled to the minimum
        ((1840, 1840), (114, 116), 3306),  # scaled into 13,312, then rounded up while it fits
        ((4000, 4000), (114, 116), 3306),
        ((1280, 720), (46, 80), 920),  # floor(side / 16) + 1 per side, then even
        ((4000, 200), (14, 250), 875),  # extreme aspect ratio, within budget as is
        ((200, 4000), (250, 14), 875),
        ((20000, 100), (8, 1250), 2500),
        ((1024, 768), (48, 64), 768),  # exact multiples of 16 keep their grid
    ],
)
def test_image_grid_and_tokens(size, grid, n):
    rows, cols = tokens.image_grid(*size)
    assert (rows, cols) == grid
    assert rows % 2 == 0 and cols % 2 == 0
    assert tokens.MIN_PATCHES <= rows * cols <= tokens.MAX_PATCHES
    assert tokens.image_tokens(*size) == n


@pytest.mark.parametrize("frames", [64, 256, 63, 255, 1])
def test_video_tokens(frames):
    per_frame = tokens.grid_tokens(*tokens.frame_grid(512, 512, 1024))
    assert per_frame == 256  # "a 512 x 512 frame pair gives 256 LM tokens"
    assert tokens.video_tokens(frames, 512, 512, tubelet=False) == frames * 256
    assert tokens.video_tokens(frames, 512, 512) == -(-frames // 2) * 256  # odd: last duplicated
    assert tokens.video_tokens(frames, 1920, 1080, target_patches=256) == (
        -(-frames // 2) * tokens.grid_tokens(*tokens.frame_grid(1920, 1080, 256))
    )


@pytest.mark.parametrize(
    ("seconds", "clips", "whole"),
    [
        (0.5, 7, 7),
        (29.9, 374, 374),
        (30.0, 376, 376),  # 1 + 3000 mel frames -> 376
        (75.0, 376 + 376 + 188, 938),  # 30 s clips (report) vs one encoder input (processor)
        (1200.0, 40 * 376, 15001),
    ],
)
def test_audio_tokens(seconds, clips, whole):
    assert tokens.audio_tokens(seconds) == clips
    assert tokens.audio_tokens(seconds, clip_seconds=0) == whole


def test_audio_clips_never_padded_and_short_tail_joins():
    sr = 16000
    assert tokens.audio_clip_samples(75 * sr, clip_seconds=0) == [75 * sr]
    assert tokens.audio_clip_samples(10 * sr) == [10 * sr]
    assert tokens.audio_clip_samples(75 * sr) == [30 * sr, 30 * sr, 15 * sr]
    assert tokens.audio_clip_samples(60 * sr + 100) == [30 * sr, 30 * sr + 100]
    with pytest.raises(ValueError, match="at least one sample"):
        tokens.audio_clip_samples(0)


def test_audio_accounting_equals_nemo_lengths():
    """NeMo's own preprocessor and a small FastConformer: the encoder's output for the
    feature extractor's length (n // hop valid frames) is the released model's count with the
    last frame included, or one fewer when that frame starts a new output position."""
    from omni_train.model.audio import build_mel_preprocessor, build_nemo_encoder

    cfg = AudioConfig(num_layers=1, d_model=16, num_heads=2, subsampling_conv_channels=4)
    mel, enc = build_mel_preprocessor(cfg).eval(), build_nemo_encoder(cfg).eval()
    for seconds in (0.5, 0.93, 5.0, 29.9, 30.0):
        n = round(seconds * cfg.sample_rate)
        with torch.no_grad():
            feats, flen = mel(input_signal=torch.randn(1, n), length=torch.tensor([n]))
            out, olen = enc(audio_signal=feats, length=flen)
        want = tokens.audio_clip_tokens(n, cfg)
        assert int(olen[0]) in (want, want - 1), seconds
        assert out.shape[-1] >= want, seconds  # the padded output holds every counted token


def test_pixel_shuffle_matches_megatron_on_square_grids_and_takes_rectangles():
    from megatron.core.models.multimodal.llava_model import pixel_shuffle as megatron_shuffle

    x = torch.randn(6 * 6, 8)
    ours = pixel_shuffle(x, 6, 6)
    theirs = megatron_shuffle(x.unsqueeze(0)).reshape(-1, 32)
    assert torch.equal(ours, theirs)
    rect = torch.arange(4 * 6 * 2, dtype=torch.float32).reshape(4 * 6, 2)
    out = pixel_shuffle(rect, 4, 6)
    assert out.shape == (2 * 3, 8)
    # every input value appears exactly once
    assert torch.equal(out.flatten().sort().values, rect.flatten())


def test_patchify_rejects_odd_grids_and_counts_tubelet_patches():
    patches, rows, cols = patchify(torch.randn(2, 3, 64, 96), 16)
    assert (rows, cols) == (4, 6) and patches.shape == (24, 2 * 3 * 16 * 16)
    with pytest.raises(ValueError, match="multiples of 32"):
        patchify(torch.randn(1, 3, 48, 64), 16)


def test_image_grid_always_fits_the_budget():
    for w in range(16, 6000, 173):
        for h in range(16, 6000, 211):
            rows, cols = tokens.image_grid(w, h)
            assert rows % 2 == 0 and cols % 2 == 0, (w, h)
            assert tokens.MIN_PATCHES <= rows * cols <= tokens.MAX_PATCHES, (w, h, rows, cols)


def test_media_items_must_come_in_sample_order():
    from omni_train.data.media import Media

    with pytest.raises(ValueError, match="image items must be in sample order"):
        Media(images=[torch.zeros(3, 32, 32)] * 2, image_sample=[1, 0])
    with pytest.raises(ValueError, match="2 audio streams but 1"):
        Media(audio=[torch.zeros(10)] * 2, audio_sample=[0])


def test_the_audio_floor_is_two_encoder_frames():
    """Short recordings (a spoken word: 0.4 s) are taken down to what the encoder can take:
    two encoder frames, 0.08 s at 16 kHz, 10 ms hop, 8x subsampling."""
    a = AudioConfig()
    assert a.floor_samples == a.min_samples == 1280
    assert tokens.audio_clip_tokens(1280, a) == 2 and tokens.audio_clip_tokens(1279, a) == 1
    assert [tokens.audio_tokens(s) for s in (0.1, 0.4, 0.49)] == [2, 6, 7]  # the processor's
    assert AudioConfig(min_seconds=0.5).min_samples == 8000  # a user's floor raises it
    with pytest.raises(ValueError, match=r"below what the encoder can take in training \(0.08 s"):
        AudioConfig(min_seconds=0.05)
    # the report layout's short last clip joins the previous one below the floor only
    assert tokens.audio_clip_samples(30 * 16000 + 1279) == [30 * 16000 + 1279]
    assert tokens.audio_clip_samples(30 * 16000 + 1600) == [30 * 16000, 1600]


@pytest.mark.parametrize("samples", [1280, 1600, 6400])
def test_a_single_short_clip_trains_alone_in_a_micro_batch(samples):
    """The conformer in training mode on one clip of a few frames (BatchNorm's statistics over
    two or more frames): output of the counted length, finite gradients and running stats; one
    sample fewer than the floor is what BatchNorm refuses."""
    from omni_train.model.audio import AudioEncoder

    cfg = AudioConfig(num_layers=1, d_model=16, num_heads=2, subsampling_conv_channels=4)
    enc = AudioEncoder(cfg).train()
    torch.manual_seed(0)
    (out,) = enc([torch.randn(samples)])
    assert out.shape == (tokens.audio_clip_tokens(samples, cfg), 16)
    out.square().sum().backward()
    grads = [p.grad for p in enc.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    norms = [m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert norms and all(torch.isfinite(m.running_var).all() for m in norms)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        enc([torch.randn(cfg.floor_samples - 1)])
