"""Write a tiny NeMo ASR model (CTC, the tiny FastConformer of model=tiny) as a .nemo file, and
its encoder's state dict beside it (``<name>.pt``), for the .nemo import test.

Usage: python tests/nemo_probe.py OUT.nemo
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf


def main(out: str) -> None:
    from nemo.collections.asr.models import EncDecCTCModel

    labels = [" ", "a", "b"]
    cfg = OmegaConf.create(
        {
            "sample_rate": 16000,
            "labels": labels,
            "preprocessor": {
                "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
                "sample_rate": 16000,
                "features": 128,
                "window_size": 0.025,
                "window_stride": 0.01,
                "n_fft": 512,
                "normalize": "per_feature",
            },
            "encoder": {
                "_target_": "nemo.collections.asr.modules.ConformerEncoder",
                "feat_in": 128,
                "n_layers": 2,
                "d_model": 32,
                "feat_out": -1,
                "subsampling": "dw_striding",
                "subsampling_factor": 8,
                "subsampling_conv_channels": 16,
                "ff_expansion_factor": 2,
                "self_attention_model": "rel_pos",
                "n_heads": 2,
                "att_context_size": [-1, -1],
                "xscaling": False,
                "untie_biases": True,
                "pos_emb_max_len": 5000,
                "conv_kernel_size": 9,
                "use_bias": False,
            },
            "decoder": {
                "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
                "feat_in": 32,
                "num_classes": len(labels),
                "vocabulary": labels,
            },
        }
    )
    torch.manual_seed(0)
    model = EncDecCTCModel(cfg=cfg)
    with torch.no_grad():  # non-default BatchNorm statistics: they must travel too
        for t in model.encoder.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.rand(t.shape) * 0.1)
    model.save_to(out)
    torch.save(model.encoder.state_dict(), Path(out).with_suffix(".pt"))


if __name__ == "__main__":
    main(sys.argv[1])
