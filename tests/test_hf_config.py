"""config.json <-> `model` (omni_train/config/hf.py), and the released-model options of the ViT."""

from __future__ import annotations

import copy
import json

import hf_reference
import pytest
import torch

from omni_train.checkpoint.manifest import architecture_diff
from omni_train.config import compose_job, to_dict
from omni_train.config import hf as hf_config
from omni_train.config.hf import UnsupportedConfigError


@pytest.fixture(scope="module")
def reference_config(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ref")
    hf_reference.save(root / "ref")
    return json.loads((root / "ref" / "config.json").read_text())


def test_model_hf_of_the_tiny_reference_is_model_tiny(reference_config, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(reference_config))
    derived = to_dict(compose_job(["model=hf", f"model.hf_path={tmp_path}"]))["model"]
    tiny = to_dict(compose_job(["model=tiny"]))["model"]
    assert architecture_diff(derived, tiny) == []
    assert derived["name"] == "hf" and derived["hf_path"] == str(tmp_path)
    # an explicit override still wins over the checkpoint's value
    cfg = compose_job(["model=hf", f"model.hf_path={tmp_path}", "model.audio.dropout=0.3"])
    assert cfg.model.audio.dropout == 0.3


def test_released_config_roundtrip_and_transformers_parameter_count():
    """The full-size model's config.json, built by transformers' own classes on the meta
    device, has the released parameter count, and derives back to model=nano_omni_30b_a3b."""
    from transformers import NemotronH_Omni_Reasoning_V3, NemotronH_Omni_Reasoning_V3_Config

    section = to_dict(compose_job(["model=nano_omni_30b_a3b"]))["model"]
    config = hf_config.omni_config(section)
    _, derived = hf_config.model_fields(config)
    assert architecture_diff(derived, section, saved_keys_only=True) == []
    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    with torch.device("meta"):
        model = NemotronH_Omni_Reasoning_V3(NemotronH_Omni_Reasoning_V3_Config(**fields))
    counts = {"all": 0, "layer_scale": 0}
    for name, p in model.named_parameters():
        counts["all"] += p.numel()
        counts["layer_scale"] += p.numel() if "layer_scale" in name else 0
    # C-RADIO's LayerScale factors are identity (1.0) and not in the released count
    assert counts["all"] - counts["layer_scale"] == 33_015_546_816


def test_legacy_field_names(reference_config):
    legacy = copy.deepcopy(reference_config)
    legacy["llm_config"] = legacy.pop("text_config")
    legacy["sound_config"] = legacy.pop("audio_config")
    legacy["img_context_token_id"] = legacy.pop("image_token_id")
    legacy["video_context_token_id"] = legacy.pop("video_token_id")
    legacy["sound_context_token_id"] = legacy.pop("audio_token_id")
    text = legacy["llm_config"]
    text["hybrid_override_pattern"] = "M*EM-E"
    del text["layers_block_type"]
    text["mamba_n_groups"] = text.pop("n_groups")
    for name in ("attention_bias", "scale_input"):  # released configs omit these two
        legacy["sound_config"].pop(name)
    assert hf_config.model_fields(legacy) == hf_config.model_fields(reference_config)


def test_lm_alone_and_components(reference_config):
    kind, fields = hf_config.model_fields(reference_config["text_config"])
    assert kind == "llm" and fields["vision"] is None and fields["hybrid_pattern"] == "M*EM-E"
    assert hf_config.kind_of(reference_config["vision_config"]) == "vision_encoder"
    wrapped = {"model_type": "parakeet_tdt", "encoder_config": reference_config["audio_config"]}
    kind, fields = hf_config.model_fields(wrapped)
    assert kind == "audio_encoder" and fields["audio"]["d_model"] == 32


@pytest.mark.parametrize(
    "where, field, value, message",
    [
        ("text_config", "num_nextn_predict_layers", 1, "multi-token-prediction"),
        ("text_config", "moe_latent_size", 16, "moe_latent_size"),
        ("text_config", "n_group", 2, "n_group"),
        ("text_config", "norm_topk_prob", False, "norm_topk_prob"),
        ("text_config", "mlp_bias", True, "mlp_bias"),
        ("vision_config", "use_swiglu_ffn", True, "use_swiglu_ffn"),
        ("audio_config", "convolution_bias", True, "one use_bias switch"),
        (None, "downsample_ratio", 0.25, "downsample_ratio"),
    ],
)
def test_unsupported_settings_are_refused(reference_config, where, field, value, message):
    cfg = copy.deepcopy(reference_config)
    (cfg[where] if where else cfg)[field] = value
    with pytest.raises(UnsupportedConfigError, match=message):
        hf_config.model_fields(cfg)


def test_another_model_type_is_refused():
    with pytest.raises(UnsupportedConfigError, match="model_type='llava'"):
        hf_config.model_fields({"model_type": "llava", "architectures": ["Llava"]})


def test_model_hf_needs_a_path_and_a_path_needs_model_hf(tmp_path):
    with pytest.raises(ValueError, match="needs model.hf_path"):
        compose_job(["model=hf"])
    with pytest.raises(ValueError, match="needs model=hf"):
        compose_job(["model=tiny", f"model.hf_path={tmp_path}"])


def test_export_refuses_what_the_reference_cannot_express():
    section = to_dict(compose_job(["model=tiny", "model.vision.final_layernorm=true"]))["model"]
    with pytest.raises(UnsupportedConfigError, match="final LayerNorm"):
        hf_config.omni_config(section)
    section = to_dict(compose_job(["model=tiny", "model.vision.tubelet_frames=1"]))["model"]
    with pytest.raises(UnsupportedConfigError, match="tubelets of 2"):
        hf_config.omni_config(section)


# ---- the ViT's released-model options ----------------------------------------------------------


@pytest.fixture(scope="module")
def radio():
    """The tiny RadioEncoder (CPU platform, one process) and megatron's original class."""
    from megatron.core.models.vision.radio import RADIOViTModel

    from omni_train.hf.convert import _job
    from omni_train.model.build import vision_transformer_config
    from omni_train.model.specs import platform_leaves, vit_layer_spec
    from omni_train.model.vision import RadioEncoder
    from omni_train.parallel.state import local_world
    from omni_train.platform import setup

    cfg = _job(None, ["model=tiny"], "fp32")
    platform = setup()
    with local_world(cfg.parallel, platform, 0) as ps:
        leaves = platform_leaves(platform)
        make = lambda corners: RadioEncoder(  # noqa: E731
            vision_transformer_config(cfg, platform),
            cfg.model.vision.__class__(**{**vars(cfg.model.vision), "cpe_align_corners": corners}),
            vit_layer_spec(leaves),
            leaves.norm,
            pg_collection=ps.pg,
        )
        yield make, RADIOViTModel


@pytest.mark.parametrize("training", [False, True])
def test_cpe_align_corners_true_is_megatrons(radio, training):
    make, megatron_cls = radio
    enc = make(True).train(training)
    for dims in [(4, 6), (8, 2), (16, 16), (10, 10)]:
        torch.manual_seed(3)
        ours = enc._get_pos_embeddings(2, dims)
        torch.manual_seed(3)
        theirs = megatron_cls._get_pos_embeddings(enc, 2, dims)
        assert torch.equal(ours, theirs), dims


def test_cpe_align_corners_false_is_the_references(radio):
    """Eval-mode CPE equals transformers' RadioPatchEmbeddings on the same grid."""
    from transformers import RadioConfig
    from transformers.models.radio.modeling_radio import RadioPatchEmbeddings

    make, _ = radio
    enc = make(False).eval()
    ref = RadioPatchEmbeddings(RadioConfig(hidden_size=32, patch_size=16, max_img_size=256))
    with torch.no_grad():
        ref.position_embedding.copy_(enc.position_embeddings)
    for dims in [(4, 6), (8, 2), (10, 10), (16, 16), (2, 16)]:
        ours = enc._get_pos_embeddings(1, dims)
        theirs = ref._interpolate_position_embedding(dims, torch.float32)
        assert torch.equal(ours, theirs), dims


@pytest.mark.parametrize("corners", [False, True])
def test_a_full_size_training_crop_is_the_plain_resize(radio, corners, monkeypatch):
    """The random crop's sample points follow the interpolation convention: with the crop
    forced to the whole grid (scale 1, aspect 1, offset 0) it is F.interpolate's resize."""
    import torch.nn.functional as F

    make, _ = radio
    enc = make(corners)
    pos = enc.position_embeddings.detach().reshape(1, 16, 16, -1).permute(0, 3, 1, 2)
    draws = iter([torch.ones(1, 1, 1), torch.full((1, 1, 1), 0.5), torch.zeros(1, 1, 1, 2)])
    monkeypatch.setattr(torch, "rand", lambda *a, **k: next(draws))
    sampled = enc._random_crop(pos, 1, (8, 12), corners)
    resized = F.interpolate(pos, size=(8, 12), mode="bilinear", align_corners=corners)
    torch.testing.assert_close(sampled, resized, rtol=1e-5, atol=1e-6)
