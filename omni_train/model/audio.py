"""The audio encoder: NeMo's FastConformer (Parakeet's encoder) and NeMo's mel preprocessor.

Using NeMo's own classes keeps parameter names identical to released ``.nemo`` checkpoints
(``encoder.*``). NeMo is imported lazily: ``import nemo.collections.asr`` costs ~9 s, which a
text-only or vision-only job should not pay.

Every waveform is one encoder input (the data layout decides how a stream is cut into clips:
``omni_train.data.layouts``), and the clips of a micro-batch run through the encoder as one padded
batch; NeMo masks the padding by length. The encoder is not tensor parallel: under TP and CP the
clips are shared out over the TP x CP ranks (``omni_train.parallel.encoder_shard``), each rank
encoding its share (:meth:`AudioEncoder.encode`). Its BatchNorm layers then take their training
statistics over the whole micro-batch (:class:`GroupBatchNorm1d`), so a sharded encoder computes
what one process computes.

Features are NeMo's mel preprocessor's, which equal the released processor's
``ParakeetFeatureExtractor`` (within 1e-4, ``tests/test_processor_parity.py``; dither, in
training only, aside): ``1 + n // hop`` frames, the last one masked. As in the released model
(``get_audio_features``), the encoder runs with the feature extractor's length (``n // hop``)
and the features of ``1 + n // hop`` frames are kept: ``tokens.audio_clip_tokens``.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from omni_train.config.model import AudioConfig
from omni_train.data.tokens import audio_clip_tokens


def build_nemo_encoder(audio: AudioConfig) -> torch.nn.Module:
    from nemo.collections.asr.modules import ConformerEncoder

    return ConformerEncoder(
        feat_in=audio.num_mel_bins,
        n_layers=audio.num_layers,
        d_model=audio.d_model,
        feat_out=-1,
        subsampling=audio.subsampling,
        subsampling_factor=audio.subsampling_factor,
        subsampling_conv_channels=audio.subsampling_conv_channels,
        ff_expansion_factor=audio.ff_expansion_factor,
        self_attention_model=audio.self_attention_model,
        n_heads=audio.num_heads,
        att_context_size=[-1, -1],
        xscaling=audio.xscaling,
        untie_biases=audio.untie_biases,
        pos_emb_max_len=audio.pos_emb_max_len,
        conv_kernel_size=audio.conv_kernel_size,
        conv_norm_type=audio.conv_norm_type,
        use_bias=audio.use_bias,
        dropout=audio.dropout,
        dropout_pre_encoder=audio.dropout,
        dropout_emb=0.0,
        dropout_att=audio.dropout,
        # NeMo all-reduces the longest input over the *default* process group on every forward
        # to size its relative-position table. Ranks without audio in a micro-batch never call
        # the encoder, so that collective would hang data-parallel training; the table is
        # computed analytically, so a per-rank size gives identical values.
        sync_max_audio_length=False,
    )


def build_mel_preprocessor(audio: AudioConfig) -> torch.nn.Module:
    from nemo.collections.asr.modules import AudioToMelSpectrogramPreprocessor

    return AudioToMelSpectrogramPreprocessor(
        sample_rate=audio.sample_rate,
        normalize="per_feature",
        window_size=audio.window_size,
        window_stride=audio.window_stride,
        window="hann",
        features=audio.num_mel_bins,
        n_fft=audio.n_fft,
        log=True,
        frame_splicing=1,
        dither=audio.dither,
        pad_to=0,
        pad_value=0.0,
    )


def init_subsampling(pre_encode: torch.nn.Module) -> None:
    """Re-initialise NeMo's ``dw_striding`` subsampling (``encoder.pre_encode``) so that the
    signal, not the biases, carries through it: He-normal weights (gain 1 for a convolution
    that no ReLU follows), zero biases. Names and shapes are unchanged.

    Why (our choice, for training from scratch; the released encoder's weights are
    pretrained, so loading them makes this moot): NeMo's ``ConvSubsampling.reset_parameters``
    draws weights and biases alike from U(+-1 / sqrt(fan_in)), which keeps a third of the
    signal's variance per layer (a sixth through a ReLU) while every layer adds its bias anew.
    Through its five convolutions and the output Linear, the tiny encoder's pre-encoded frames
    came out 99 % bias: their variation over time was 12 % of their RMS, the conformer's output
    tokens differed by 1 % between tones, and in 2 of 3 learnability runs the audio path never
    left that state (the audio tasks at chance after 1500 steps while every vision task reached
    100 %; benchmarks/results/learning_explore/audio_init).
    """
    modules = [*pre_encode.conv, pre_encode.out]
    with torch.no_grad():
        for layer, after in zip(modules, [*modules[1:], None], strict=True):
            if not isinstance(layer, torch.nn.Conv2d | torch.nn.Linear):
                continue
            gain = "relu" if isinstance(after, torch.nn.ReLU) else "linear"
            torch.nn.init.kaiming_normal_(layer.weight, nonlinearity=gain)
            if layer.bias is not None:
                layer.bias.zero_()


class GroupBatchNorm1d(torch.nn.BatchNorm1d):
    """NeMo's conformer BatchNorm with its training statistics taken over a process group.

    Outside :meth:`over` (one process, or eval mode) it is ``torch.nn.BatchNorm1d`` unchanged;
    the class is swapped onto NeMo's modules in place, so parameter and buffer names stay those
    of a ``.nemo`` checkpoint. Inside, each rank holds some clips of a micro-batch, all padded to
    the micro-batch's longest (as one process pads them): the per-channel sums, and then the
    squared deviations, are all-reduced (differentiably) over the group, so mean, variance,
    output, gradients and the running statistics are those of one process over every clip.
    ``weight`` per clip, 0 for a placeholder clip a rank without clips runs so that it takes
    part in the collectives. torch's SyncBatchNorm does the same on GPUs only.
    """

    group = None
    clip_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [clips, channels, frames]
        if self.group is None or not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        # statistics in fp32 whatever the activations' dtype, as torch's and cuDNN's kernels do
        xf = x.float()
        w = self.clip_weight.float()[:, None, None]
        count = all_reduce(w.sum() * x.shape[2], group=self.group)
        mean = all_reduce((xf * w).sum((0, 2)), group=self.group) / count
        centred = xf - mean[None, :, None]
        var = all_reduce((centred.square() * w).sum((0, 2)), group=self.group) / count
        y = centred * torch.rsqrt(var + self.eps)[None, :, None]
        if self.affine:
            y = y * self.weight.float()[None, :, None] + self.bias.float()[None, :, None]
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum
                if m is None:  # cumulative average, as torch's BatchNorm
                    m = 1.0 / float(self.num_batches_tracked)
                unbiased = var * count / (count - 1)
                stats = self.running_mean.dtype
                self.running_mean.mul_(1 - m).add_(mean.detach().to(stats) * m)
                self.running_var.mul_(1 - m).add_(unbiased.detach().to(stats) * m)
        return y.to(x.dtype)


class AudioEncoder(torch.nn.Module):
    """Waveforms -> per-stream features ``[tokens_i, d_model]`` (12.5 tokens/s at 8x).
    ``init``: re-initialise the subsampling for training from scratch (:func:`init_subsampling`);
    off for meta-device builds, whose weights are never drawn."""

    def __init__(self, audio: AudioConfig, init: bool = True):
        super().__init__()
        self.cfg = audio
        self.encoder = build_nemo_encoder(audio)
        for m in self.encoder.modules():
            if type(m) is torch.nn.BatchNorm1d:
                m.__class__ = GroupBatchNorm1d
        if init and audio.subsampling == "dw_striding":
            init_subsampling(self.encoder.pre_encode)
        # Held outside the module tree on purpose: it has no parameters, must stay in fp32 when
        # the model is cast to bf16 (its filterbank would lose precision), and must not enter
        # checkpoints. Its train/eval mode follows this module's in forward().
        self._mel = (build_mel_preprocessor(audio),)

    def _apply(self, fn, recurse=True):  # .to()/.cpu()/.cuda() also move the preprocessor
        super()._apply(fn, recurse)
        mel = self._mel[0]
        probe = fn(torch.zeros(1))
        mel.to(device=probe.device)
        return self

    def features(self, clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips ``[n_i]`` -> mel features ``[clips, 1 + max n // hop, mels]`` (float32, zero
        past each clip's ``n_i // hop`` valid frames) and the valid lengths ``[clips]``."""
        mel = self._mel[0]
        mel.train(self.training)  # dither only in training, as NeMo does
        lengths = torch.tensor([c.shape[0] for c in clips], device=clips[0].device)
        signal = pad_sequence([c.float() for c in clips], batch_first=True)  # [clips, n_max]
        with torch.no_grad():  # features are inputs; nothing upstream needs their gradient
            feats, feat_lengths = mel(input_signal=signal, length=lengths)  # [clips, mels, T]
        return feats.transpose(1, 2), feat_lengths

    def forward(self, clips: list[torch.Tensor]) -> list[torch.Tensor]:
        """``clips``: mono float ``[n_i]`` at ``sample_rate`` -> ``[tokens_i, d_model]``."""
        feats, feat_lengths = self.features(clips)
        out = self.encode(feats, feat_lengths)
        return [out[k, : audio_clip_tokens(c.shape[0], self.cfg)] for k, c in enumerate(clips)]

    def encode(
        self,
        feats: torch.Tensor,
        lengths: torch.Tensor,
        group=None,
        clip_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mel features ``[clips, frames, mels]`` (:meth:`features`) -> encoder output
        ``[clips, frames / subsampling, d_model]``. ``group``: the process group whose ranks
        share the micro-batch's clips (BatchNorm statistics over all of them), ``clip_weight``
        ``[clips]`` 1 for a clip, 0 for a placeholder (:class:`GroupBatchNorm1d`)."""
        # Set for this call and left in place until the next: a conformer layer recomputed in
        # backward (recompute.audio_encoder) must normalise over the same group and clips.
        weight = None
        if group is not None:
            weight = clip_weight if clip_weight is not None else feats.new_ones(feats.shape[0])
        for m in self.encoder.modules():
            if isinstance(m, GroupBatchNorm1d):
                m.group, m.clip_weight = group, weight
        dtype = next(self.encoder.parameters()).dtype
        out, _ = self.encoder(audio_signal=feats.transpose(1, 2).to(dtype), length=lengths)
        return out.transpose(1, 2)
