"""A NeMo ``.nemo`` Parakeet (any NeMo ASR model with a FastConformer encoder), through NeMo's
own ``ASRModel.restore_from``: the encoder config and the state dict, with NeMo's names.

omni-train's audio encoder *is* NeMo's ``ConformerEncoder``, so the encoder's weights map one
to one (``encoder.*`` -> ``audio_encoder.encoder.*``). The mel preprocessor's settings are
compared too: omni-train computes features with NeMo's ``AudioToMelSpectrogramPreprocessor``
from ``model.audio``, and a checkpoint trained on other features would silently degrade.
"""

from __future__ import annotations

from pathlib import Path

import torch

from omni_train.config.hf import UnsupportedConfigError


def _require(name: str, value, wanted) -> None:
    if value != wanted:
        raise UnsupportedConfigError(
            f".nemo encoder {name}={value!r}: omni-train supports {wanted!r}"
        )


def read_nemo(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(``model.audio`` fields, the ASR model's state dict) of a ``.nemo`` file."""
    from nemo.collections.asr.models import ASRModel

    model = ASRModel.restore_from(str(path), map_location="cpu")
    enc, pre = model.cfg.encoder, model.cfg.preprocessor
    if "ConformerEncoder" not in str(enc.get("_target_", "")):
        raise UnsupportedConfigError(
            f"{path}: encoder {enc.get('_target_')} is not NeMo's ConformerEncoder"
        )
    _require("att_context_size", list(enc.get("att_context_size", [-1, -1])), [-1, -1])
    _require("subsampling", enc.get("subsampling"), "dw_striding")
    _require("self_attention_model", enc.get("self_attention_model", "rel_pos"), "rel_pos")
    _require("causal_downsampling", enc.get("causal_downsampling", False), False)
    fields = {
        "num_layers": enc.n_layers,
        "d_model": enc.d_model,
        "num_heads": enc.n_heads,
        "ff_expansion_factor": enc.ff_expansion_factor,
        "conv_kernel_size": enc.conv_kernel_size,
        "subsampling": "dw_striding",
        "subsampling_factor": enc.subsampling_factor,
        "subsampling_conv_channels": enc.subsampling_conv_channels,
        "self_attention_model": "rel_pos",
        "pos_emb_max_len": enc.get("pos_emb_max_len", 5000),
        "xscaling": bool(enc.get("xscaling", True)),
        "untie_biases": bool(enc.get("untie_biases", True)),
        "use_bias": bool(enc.get("use_bias", True)),
        "conv_norm_type": enc.get("conv_norm_type", "batch_norm"),
        "num_mel_bins": enc.feat_in,
        "sample_rate": pre.get("sample_rate", 16000),
        "window_size": pre.get("window_size", 0.02),
        "window_stride": pre.get("window_stride", 0.01),
        "n_fft": pre.get("n_fft", 512),
    }
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return fields, state
