"""A tiny random reference model (transformers 5.23 ``NemotronH_Omni_Reasoning_V3``) shaped like
``model=tiny``, with every weight and buffer perturbed so that a swapped or misplaced tensor
changes the logits (defaults such as norm weights of one or BatchNorm statistics of 0/1 would
hide it), and one Mamba head whose time step falls under the released clamp (1e-3), so the
clamp matters.

Run as a script: ``python tests/hf_reference.py OUT [--lm-only|--radio-only|--parakeet-only]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

TEXT = dict(
    model_type="nemotron_h",
    vocab_size=512,
    hidden_size=64,
    # "M*EM-E", as model=tiny
    layers_block_type=[
        "linear_attention",
        "full_attention",
        "moe",
        "linear_attention",
        "mlp",
        "moe",
    ],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    mamba_num_heads=4,
    mamba_head_dim=16,
    ssm_state_size=16,
    n_groups=2,
    conv_kernel=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=64,
    moe_shared_expert_intermediate_size=128,
    routed_scaling_factor=2.5,
    layer_norm_epsilon=1e-5,
)
VISION = dict(
    model_type="radio",
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    mlp_ratio=2.0,
    max_img_size=256,
    num_cls_tokens=2,  # summary_idxs [0, 1] index the cls tokens
    num_registers=0,
    video_temporal_patch_size=2,
)
AUDIO = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    num_mel_bins=128,
    subsampling_conv_channels=16,
    convolution_bias=False,
    projection_hidden_size=64,
    projection_bias=False,
)
# the tiny recipe's data-side vision settings (the HF config does not describe them)
TINY_DATA = [
    "model.vision.min_patches=4",
    "model.vision.max_patches=64",
    "model.vision.video_patch_budgets=[16,32]",
]


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.state_dict().items()):
        if not t.is_floating_point():
            continue
        noise = torch.randn(t.shape, generator=g) * 0.1
        if name.endswith("running_var"):
            t.copy_(1.0 + noise.abs())
        elif name.endswith("A_log"):
            t.add_(noise)
        elif name.endswith("dt_bias"):
            t.add_(noise)
            t[0] = -8.0  # softplus(-8 + dt) ~ 3e-4 < time_step_min: the clamp is active
        elif name.endswith("lambda1"):
            continue  # C-RADIO's LayerScale is 1
        else:
            t.add_(noise * (t.abs().mean() + 0.1))


def omni(seed: int = 0):
    from transformers import NemotronH_Omni_Reasoning_V3, NemotronH_Omni_Reasoning_V3_Config

    cfg = NemotronH_Omni_Reasoning_V3_Config(
        text_config=TEXT,
        vision_config=VISION,
        audio_config=AUDIO,
        projector_hidden_size=128,
        vision_hidden_size=32,
        image_token_id=10,
        video_token_id=11,
        audio_token_id=12,
    )
    torch.manual_seed(seed)
    model = NemotronH_Omni_Reasoning_V3(cfg).eval()
    perturb(model, seed)
    return model


def save(out: str | Path, part: str = "omni", seed: int = 0) -> Path:
    out = Path(out)
    model = omni(seed)
    if part == "lm":
        model = model.language_model
    elif part == "radio":
        from transformers import RadioConfig, RadioModel

        vision = {k: v for k, v in VISION.items() if k != "video_temporal_patch_size"}
        model = RadioModel(RadioConfig(**{**vision, "model_type": "radio"}))
        perturb(model, seed)
    elif part == "parakeet":
        model = model.audio_tower
    model.save_pretrained(out)
    return out


if __name__ == "__main__":
    part = {"--lm-only": "lm", "--radio-only": "radio", "--parakeet-only": "parakeet"}
    print(save(sys.argv[1], part.get(sys.argv[2], "omni") if len(sys.argv) > 2 else "omni"))
