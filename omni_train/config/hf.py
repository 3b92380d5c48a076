"""Model configs of Hugging Face checkpoints: ``config.json`` <-> omni-train ``model`` fields.

Four kinds of checkpoint are read (the released model and the pretrained parts stage 0 starts
from), named by their ``model_type``:

=====================  =========================  ===============================
kind                   ``model_type``             omni-train part
=====================  =========================  ===============================
``omni``               ``nemotron_h_omni``        the whole model
``llm``                ``nemotron_h``             ``llm`` (top-level LM fields)
``vision_encoder``     ``radio``                  ``model.vision``
``audio_encoder``      ``parakeet_encoder`` (or a ``parakeet_ctc/rnnt/tdt`` config's
                       ``encoder_config``)        ``model.audio``
=====================  =========================  ===============================

Field names are transformers 5.23's (``NemotronH_Omni_Reasoning_V3_Config``, ``NemotronHConfig``,
``RadioConfig``, ``ParakeetEncoderConfig``), with the legacy names released configs still
carry (``llm_config``, ``sound_config``, ``img_context_token_id``, ``hybrid_override_pattern``,
``mamba_n_groups``, ...). A setting omni-train cannot reproduce (grouped routing, a MoE latent
projection, MTP layers, SwiGLU in the ViT, ...) is refused with the field and its value, never
approximated. Fields a checkpoint does not describe (training choices: the aux-loss
coefficient, dropout, the video patch budgets, clip length) keep omni-train's defaults, which are
the published recipe's.

Pure Python (json only): composing a config must not import torch or transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# transformers' layer type names <-> megatron-core's hybrid pattern symbols
_LAYER_SYMBOL = {"linear_attention": "M", "moe": "E", "full_attention": "*", "mlp": "-"}
_SYMBOL_LAYER = {v: k for k, v in _LAYER_SYMBOL.items()}
_AUDIO_WRAPPERS = ("parakeet_ctc", "parakeet_rnnt", "parakeet_tdt", "parakeet")
KINDS = ("omni", "llm", "vision_encoder", "audio_encoder")


class UnsupportedConfigError(ValueError):
    """A checkpoint setting omni-train's model cannot reproduce."""


def read_config(path: str | Path) -> dict:
    """``config.json`` of a checkpoint folder (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (a Hugging Face checkpoint folder?)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None


def kind_of(hf: dict) -> str:
    """Which of :data:`KINDS` a config describes."""
    model_type = hf.get("model_type", "")
    archs = hf.get("architectures") or []
    if model_type == "nemotron_h_omni" or "NemotronH_Omni_Reasoning_V3" in archs:
        return "omni"
    if model_type == "nemotron_h":
        return "llm"
    if model_type == "radio":
        return "vision_encoder"
    if model_type == "parakeet_encoder" or model_type in _AUDIO_WRAPPERS:
        return "audio_encoder"
    raise UnsupportedConfigError(
        f"config.json has model_type={model_type!r} (architectures {archs}); omni-train reads "
        "nemotron_h_omni (the whole model), nemotron_h (its LM), radio (its vision encoder) and "
        "parakeet / parakeet_encoder (its audio encoder)"
    )


def _get(hf: dict, *names: str, default: Any = None) -> Any:
    """The first of ``names`` present (current name first, then legacy ones)."""
    for name in names:
        if name in hf and hf[name] is not None:
            return hf[name]
    return default


def _require(where: str, name: str, value: Any, wanted: Any, why: str) -> None:
    if value != wanted:
        raise UnsupportedConfigError(
            f"{where}.{name}={value!r}: omni-train supports {wanted!r} ({why})"
        )


# ---- HF -> omni-train -------------------------------------------------------------------------


def llm_fields(text: dict) -> dict:
    """``nemotron_h`` config -> the LM fields of ``ModelConfig``."""
    w = "text_config"
    layers = _get(text, "layers_block_type", "layer_types")
    if layers is None and "hybrid_override_pattern" in text:
        pattern = text["hybrid_override_pattern"]
    elif layers is not None:
        unknown = sorted(set(layers) - set(_LAYER_SYMBOL))
        if unknown:
            raise UnsupportedConfigError(f"{w}.layers_block_type has unknown layer types {unknown}")
        pattern = "".join(_LAYER_SYMBOL[t] for t in layers)
    else:
        raise UnsupportedConfigError(
            f"{w} has neither layers_block_type nor hybrid_override_pattern"
        )
    mtp = _get(text, "num_nextn_predict_layers", default=0)
    if mtp:
        raise UnsupportedConfigError(
            f"{w}.num_nextn_predict_layers={mtp}: the checkpoint has multi-token-prediction "
            "layers, which omni-train's LM (megatron-core 0.16.1 MambaModel) does not build; "
            "they would be dropped, so the import is refused"
        )
    for name, wanted, why in (
        ("moe_latent_size", None, "no latent projection around the experts"),
        ("n_group", 1, "no group-limited routing"),
        ("topk_group", 1, "no group-limited routing"),
        ("norm_topk_prob", True, "megatron normalises the top-k sigmoid scores"),
        ("mlp_hidden_act", "relu2", "squared-ReLU experts and MLPs"),
        ("mamba_hidden_act", "silu", "megatron's Mamba2 mixer"),
        ("residual_in_fp32", False, "residuals in the model dtype"),
        ("sliding_window", None, "full attention"),
        ("use_conv_bias", True, "megatron's Mamba2 conv1d has a bias"),
    ):
        default = {"n_group": 1, "topk_group": 1, "norm_topk_prob": True}.get(name, wanted)
        _require(w, name, _get(text, name, default=default), wanted, why)
    for name in ("use_bias", "mlp_bias", "attention_bias", "mamba_proj_bias"):
        _require(w, name, bool(text.get(name, False)), False, "no linear biases in the LM")
    has_moe = "E" in pattern
    return {
        "hybrid_pattern": pattern,
        "hidden_size": text["hidden_size"],
        "vocab_size": text["vocab_size"],
        "num_attention_heads": text["num_attention_heads"],
        "num_query_groups": _get(text, "num_key_value_heads", default=text["num_attention_heads"]),
        "head_dim": _get(
            text, "head_dim", default=text["hidden_size"] // text["num_attention_heads"]
        ),
        "ffn_hidden_size": _get(text, "intermediate_size", default=1),
        "num_moe_experts": _get(text, "n_routed_experts", default=0) if has_moe else 0,
        "moe_router_topk": _get(text, "num_experts_per_tok", default=1),
        "moe_ffn_hidden_size": _get(text, "moe_intermediate_size", default=0),
        "moe_shared_expert_ffn_hidden_size": (
            _get(text, "moe_shared_expert_intermediate_size", default=0)
            if _get(text, "n_shared_experts", default=1)
            else 0
        ),
        # NemotronHTopkRouter: sigmoid scores, e_score_correction_bias for the choice only
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "moe_router_topk_scaling_factor": float(_get(text, "routed_scaling_factor", default=1.0)),
        "mamba_num_heads": _get(text, "mamba_num_heads", default=0),
        "mamba_head_dim": _get(text, "mamba_head_dim", default=64),
        "mamba_state_dim": _get(text, "ssm_state_size", default=128),
        "mamba_num_groups": _get(text, "n_groups", "mamba_n_groups", default=8),
        "mamba_conv_kernel": _get(text, "conv_kernel", "mamba_d_conv", default=4),
        # NemotronHMamba2Mixer clamps at time_step_min whatever time_step_limit says
        "mamba_dt_clamp_min": float(_get(text, "time_step_min", "mamba_dt_min", default=1e-3)),
        "activation": "squared_relu",
        "normalization": "RMSNorm",
        "norm_eps": float(_get(text, "layer_norm_epsilon", default=1e-5)),
        "add_bias_linear": False,
        "untie_embeddings": not _get(text, "tie_word_embeddings", default=False),
        "init_method_std": float(_get(text, "initializer_range", default=0.02)),
    }


def vision_fields(radio: dict) -> dict:
    """``radio`` config -> ``ModelConfig.vision`` fields. ``tubelet_frames`` is None for an
    image-only RADIO (no video embedder in the checkpoint)."""
    w = "vision_config"
    for name, wanted, why in (
        ("use_swiglu_ffn", False, "a GELU MLP in every ViT block"),
        ("hidden_act", "gelu", "exact GELU"),
        ("qkv_bias", True, "biased q/k/v projections"),
        ("num_channels", 3, "RGB input"),
    ):
        _require(w, name, radio.get(name, wanted), wanted, why)
    hidden = radio.get("hidden_size", 1280)
    ffn = hidden * float(radio.get("mlp_ratio", 4.0))
    if ffn != int(ffn):
        raise UnsupportedConfigError(f"{w}: hidden_size x mlp_ratio = {ffn} is not an integer")
    return {
        "num_layers": radio.get("num_hidden_layers", 32),
        "hidden_size": hidden,
        "num_attention_heads": radio.get("num_attention_heads", 16),
        "ffn_hidden_size": int(ffn),
        "norm_eps": float(radio.get("layer_norm_eps", 1e-6)),
        "patch_size": radio.get("patch_size", 16),
        "max_image_size": radio.get("max_img_size", 2048),
        "num_class_tokens": radio.get("num_cls_tokens", 3) + radio.get("num_registers", 7),
        "tubelet_frames": radio.get("video_temporal_patch_size"),
        "init_method_std": float(radio.get("initializer_range", 0.02)),
        "cpe_align_corners": False,
        "final_layernorm": False,
    }


def _parakeet_encoder(hf: dict) -> dict:
    if hf.get("model_type") in _AUDIO_WRAPPERS and "encoder_config" in hf:
        return hf["encoder_config"]
    return hf


def audio_fields(audio: dict) -> dict:
    """``parakeet_encoder`` config (or a Parakeet CTC/RNNT/TDT config) -> ``ModelConfig.audio``.

    Defaults are the omni model's (``NemotronH_Omni_Reasoning_V3_Config`` supplies
    ``attention_bias=False, scale_input=False`` for the released configs that omit them)."""
    w = "audio_config"
    enc = _parakeet_encoder(audio)
    hidden = enc.get("hidden_size", 1024)
    ffn = enc.get("intermediate_size", 4 * hidden)
    attention_bias = enc.get("attention_bias", False)
    conv_bias = enc.get("convolution_bias", True)  # ParakeetEncoderConfig's default
    if attention_bias != conv_bias:
        raise UnsupportedConfigError(
            f"{w}: attention_bias={attention_bias} but convolution_bias={conv_bias}; NeMo's "
            "ConformerEncoder has one use_bias switch for attention, feed-forward and conv"
        )
    if ffn % hidden:
        raise UnsupportedConfigError(f"{w}: intermediate_size={ffn} is not a multiple of {hidden}")
    for name, wanted, why in (
        ("hidden_act", "silu", "NeMo's Swish"),
        ("subsampling_conv_kernel_size", 3, "NeMo's dw_striding"),
        ("subsampling_conv_stride", 2, "NeMo's dw_striding"),
    ):
        _require(w, name, enc.get(name, wanted), wanted, why)
    if enc.get("projection_bias", False):
        raise UnsupportedConfigError(
            f"{w}.projection_bias=True: omni-train's projectors have no bias"
        )
    return {
        "num_layers": enc.get("num_hidden_layers", 24),
        "d_model": hidden,
        "num_heads": enc.get("num_attention_heads", 8),
        "ff_expansion_factor": ffn // hidden,
        "conv_kernel_size": enc.get("conv_kernel_size", 9),
        "subsampling": "dw_striding",
        "subsampling_factor": enc.get("subsampling_factor", 8),
        "subsampling_conv_channels": enc.get("subsampling_conv_channels", 256),
        "self_attention_model": "rel_pos",
        "pos_emb_max_len": enc.get("max_position_embeddings", 5000),
        "xscaling": bool(enc.get("scale_input", False)),
        "untie_biases": True,
        "use_bias": bool(attention_bias),
        "num_mel_bins": enc.get("num_mel_bins", 128),
    }


def omni_fields(hf: dict) -> dict:
    """``nemotron_h_omni`` config -> every ``ModelConfig`` field it determines."""
    text = _get(hf, "text_config", "llm_config")
    if text is None:
        raise UnsupportedConfigError("the omni config has no text_config (llm_config)")
    out = llm_fields(text)
    ratio = hf.get("downsample_ratio", 0.5)
    _require("config", "downsample_ratio", ratio, 0.5, "the 2x2 pixel shuffle")
    radio = hf.get("vision_config") or {}
    vision = vision_fields(radio)
    tubelet = hf.get("video_temporal_patch_size", 2)
    if vision["tubelet_frames"] not in (None, tubelet):
        raise UnsupportedConfigError(
            f"vision_config.video_temporal_patch_size={vision['tubelet_frames']} but "
            f"video_temporal_patch_size={tubelet}"
        )
    vision["tubelet_frames"] = tubelet
    vit_hidden = _get(hf, "vision_hidden_size", "vit_hidden_size", default=vision["hidden_size"])
    if vit_hidden != vision["hidden_size"]:
        raise UnsupportedConfigError(
            f"vision_hidden_size={vit_hidden} but vision_config.hidden_size={vision['hidden_size']}"
        )
    out["vision"] = vision
    out["vision_projector_ffn_hidden_size"] = hf.get("projector_hidden_size", 4096)
    audio = _get(hf, "audio_config", "sound_config")
    if audio is not None:
        # NemotronH_Omni_Reasoning_V3_Config's defaults for released configs that omit them
        audio = {"attention_bias": False, "scale_input": False, **audio}
        out["audio"] = audio_fields(audio)
        out["audio_projector_ffn_hidden_size"] = audio.get("projection_hidden_size", 4096)
    else:
        out["audio"] = None
        out["audio_projector_ffn_hidden_size"] = 0
    ids = {
        "image": _get(hf, "image_token_id", "img_context_token_id"),
        "video": _get(hf, "video_token_id", "video_context_token_id"),
        "audio": _get(hf, "audio_token_id", "sound_context_token_id"),
    }
    if audio is None and ids["audio"] is None:
        ids.pop("audio")
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise UnsupportedConfigError(f"the omni config does not give the {missing} placeholder ids")
    out["media_tokens"] = ids
    return out


def model_fields(hf: dict) -> tuple[str, dict]:
    """(kind, ``ModelConfig`` fields) of a checkpoint config. For an ``llm`` checkpoint the
    encoders are ``None``; for an encoder checkpoint only ``vision`` or ``audio`` is given."""
    kind = kind_of(hf)
    if kind == "omni":
        return kind, omni_fields(hf)
    if kind == "llm":
        fields = llm_fields(hf)
        fields.update(vision=None, audio=None)
        fields.update(vision_projector_ffn_hidden_size=0, audio_projector_ffn_hidden_size=0)
        return kind, fields
    if kind == "vision_encoder":
        return kind, {"vision": vision_fields(hf)}
    return kind, {"audio": audio_fields(hf)}


# ---- omni-train -> HF (export) ----------------------------------------------------------------


def text_config(m: dict) -> dict:
    """The ``nemotron_h`` config of a ``model`` section (``to_dict(cfg)["model"]``)."""
    return {
        "model_type": "nemotron_h",
        "layers_block_type": [_SYMBOL_LAYER[s] for s in m["hybrid_pattern"]],
        "hidden_size": m["hidden_size"],
        "vocab_size": m["vocab_size"],
        "num_attention_heads": m["num_attention_heads"],
        "num_key_value_heads": m["num_query_groups"],
        "head_dim": m["head_dim"],
        "intermediate_size": m["ffn_hidden_size"],
        "n_routed_experts": max(m["num_moe_experts"], 1),
        "num_experts_per_tok": m["moe_router_topk"],
        "moe_intermediate_size": m["moe_ffn_hidden_size"],
        "moe_shared_expert_intermediate_size": m["moe_shared_expert_ffn_hidden_size"],
        "n_shared_experts": 1 if m["moe_shared_expert_ffn_hidden_size"] else 0,
        "routed_scaling_factor": m["moe_router_topk_scaling_factor"],
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "mamba_num_heads": m["mamba_num_heads"],
        "mamba_head_dim": m["mamba_head_dim"],
        "ssm_state_size": m["mamba_state_dim"],
        "n_groups": m["mamba_num_groups"],
        "conv_kernel": m["mamba_conv_kernel"],
        "time_step_min": m["mamba_dt_clamp_min"],
        "mlp_hidden_act": "relu2",
        "mamba_hidden_act": "silu",
        "layer_norm_epsilon": m["norm_eps"],
        "tie_word_embeddings": not m["untie_embeddings"],
        "use_bias": False,
        "mlp_bias": False,
        "attention_bias": False,
        "use_conv_bias": True,
        "num_nextn_predict_layers": 0,
        "initializer_range": m["init_method_std"],
    }


def radio_config(v: dict) -> dict:
    return {
        "model_type": "radio",
        "hidden_size": v["hidden_size"],
        "num_hidden_layers": v["num_layers"],
        "num_attention_heads": v["num_attention_heads"],
        "mlp_ratio": v["ffn_hidden_size"] / v["hidden_size"],
        "layer_norm_eps": v["norm_eps"],
        "patch_size": v["patch_size"],
        "max_img_size": v["max_image_size"],
        # the release: 3 summary (cls) tokens + 7 registers; omni-train drops all of them
        "num_cls_tokens": min(3, v["num_class_tokens"]),
        "num_registers": v["num_class_tokens"] - min(3, v["num_class_tokens"]),
        "video_temporal_patch_size": v["tubelet_frames"],
        "qkv_bias": True,
        "hidden_act": "gelu",
        "use_swiglu_ffn": False,
        "layerscale_value": 1.0,
        "initializer_range": v["init_method_std"],
    }


def parakeet_config(a: dict, projector_ffn: int) -> dict:
    return {
        "model_type": "parakeet_encoder",
        "hidden_size": a["d_model"],
        "num_hidden_layers": a["num_layers"],
        "num_attention_heads": a["num_heads"],
        "intermediate_size": a["ff_expansion_factor"] * a["d_model"],
        "conv_kernel_size": a["conv_kernel_size"],
        "subsampling_factor": a["subsampling_factor"],
        "subsampling_conv_channels": a["subsampling_conv_channels"],
        "num_mel_bins": a["num_mel_bins"],
        "max_position_embeddings": a["pos_emb_max_len"],
        "scale_input": a["xscaling"],
        "attention_bias": a["use_bias"],
        "convolution_bias": a["use_bias"],
        "hidden_act": "silu",
        "projection_hidden_size": projector_ffn,
        "projection_bias": False,
    }


def check_exportable(m: dict) -> None:
    """Refuse ``model`` settings the reference model cannot express (raises ValueError)."""
    fixed = (
        ("activation", "squared_relu"),
        ("normalization", "RMSNorm"),
        ("add_bias_linear", False),
        ("moe_router_score_function", "sigmoid"),
        ("moe_router_enable_expert_bias", True),
        ("projector_norm_eps", 1e-5),
    )
    for name, wanted in fixed:
        if m[name] != wanted:
            raise UnsupportedConfigError(
                f"model.{name}={m[name]!r}: the reference model (transformers nemotron_h_omni) "
                f"has {wanted!r} only; this model cannot be exported"
            )
    v, a = m.get("vision"), m.get("audio")
    if v is not None and v["tubelet_frames"] != 2:
        raise UnsupportedConfigError(
            f"model.vision.tubelet_frames={v['tubelet_frames']}: the reference omni model embeds "
            "video as tubelets of 2 frames (video_temporal_patch_size=2)"
        )
    if v is not None and (v["cpe_align_corners"] or v["final_layernorm"]):
        raise UnsupportedConfigError(
            "model.vision.cpe_align_corners / final_layernorm are true: the reference RADIO "
            "resizes its CPE with align_corners=False and has no learned final LayerNorm"
        )
    if a is not None and (not a["untie_biases"] or a["self_attention_model"] != "rel_pos"):
        raise UnsupportedConfigError(
            "model.audio: the reference Parakeet encoder has per-layer (untied) rel_pos biases"
        )


def omni_config(m: dict, base: dict | None = None) -> dict:
    """The ``nemotron_h_omni`` (or, without encoders, ``nemotron_h``) config.json of a
    ``model`` section. ``base`` (the config.json the model was imported from) keeps what
    omni-train does not model (token ids of the tokenizer, generation settings, ...); every
    architecture field is omni-train's."""
    check_exportable(m)
    text = text_config(m)
    if m.get("vision") is None and m.get("audio") is None:
        out = dict(base or {})
        out.update(text, architectures=["NemotronHForCausalLM"])
        return out
    if m.get("vision") is None:
        raise UnsupportedConfigError(
            "model has an audio encoder but no vision encoder; the reference omni model always "
            "has both a language model and RADIO"
        )
    out = dict(base or {})
    for legacy in ("llm_config", "sound_config", "img_context_token_id", "vit_hidden_size"):
        out.pop(legacy, None)
    out.pop("video_context_token_id", None)
    out.pop("sound_context_token_id", None)
    out["text_config"] = {**(out.get("text_config") or {}), **text}
    v = m["vision"]
    out["vision_config"] = {**(out.get("vision_config") or {}), **radio_config(v)}
    out.update(
        model_type="nemotron_h_omni",
        architectures=["NemotronH_Omni_Reasoning_V3"],
        downsample_ratio=0.5,
        projector_hidden_size=m["vision_projector_ffn_hidden_size"],
        vision_hidden_size=v["hidden_size"],
        video_temporal_patch_size=v["tubelet_frames"],
        image_token_id=m["media_tokens"]["image"],
        video_token_id=m["media_tokens"]["video"],
    )
    if m.get("audio") is not None:
        audio = parakeet_config(m["audio"], m["audio_projector_ffn_hidden_size"])
        out["audio_config"] = {**(out.get("audio_config") or {}), **audio}
        out["audio_token_id"] = m["media_tokens"]["audio"]
    else:
        out["audio_config"] = None
    return out


# ---- `model=hf`: a checkpoint's config as Hydra overrides --------------------------------------


def _hydra_value(value: Any) -> str:
    """One value in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as a Hydra override")


def model_overrides(hf_path: str | Path) -> list[str]:
    """``model.<field>=<value>`` overrides that make ``model`` the checkpoint's (omni or LM)."""
    kind, fields = model_fields(read_config(hf_path))
    if kind in ("vision_encoder", "audio_encoder"):
        raise UnsupportedConfigError(
            f"model.hf_path={hf_path} is a {kind} checkpoint; model.hf_path takes the omni model "
            "or its LM (nemotron_h). Import an encoder for stage 0 with `omni-train checkpoint "
            "import-hf DIR --out OUT model=<the model it joins>` and pass "
            f"+checkpoint.init_components.{kind}=OUT"
        )
    return [f"model.{k}={_hydra_value(v)}" for k, v in fields.items()]
