"""Which released tensors make each omni-train weight, and back.

Names on the omni-train side are the model's *local* state-dict keys at TP=1 on the CPU
platform (megatron-core's ``MambaModel``/``RADIOViTModel``/``MultimodalProjector`` and NeMo's
``ConformerEncoder``); torch_dist then reshards them to any TP/EP layout. Names on the other
side are the **released on-disk names**: what ``save_pretrained`` of transformers 5.23 writes
(it reverses ``conversion_mapping.py``), what the released checkpoint holds and what vLLM
reads. A checkpoint saved with transformers' *current* in-memory names (``language_model.model.``,
``vision_model.embeddings.``, ``audio_tower.``, merged ``experts.up_proj``, split RADIO q/k/v)
is read through :class:`CurrentNames`, which presents it under the released names.

Where the layouts differ:

- attention q/k/v: megatron fuses them into ``linear_qkv`` grouped per query group
  (``[q of group g | k_g | v_g]`` for each g); the LM stores ``q_proj``/``k_proj``/``v_proj``,
  RADIO one ``attn.qkv`` = ``[q; k; v]``;
- pre-norms: megatron fuses each block's norm into the next linear (``layer_norm_weight``,
  TE's layout); the reference keeps ``norm`` / ``norm1`` / ``norm2`` modules;
- MoE experts: one ``local_experts.e`` MLP per expert here, ``experts.e.up_proj``/``down_proj``
  on disk (merged ``[E, out, in]`` tensors in memory);
- the Parakeet encoder: NeMo's names (``linear_q``, ``pos_bias_u``, ``batch_norm``,
  ``pre_encode``) against transformers' (``q_proj``, ``bias_u``, ``norm``, ``subsampling``).

Everything else is a rename. Shapes are checked on both ways in.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class Rule:
    """One omni-train weight: the released tensors it is made of and the two conversions."""

    ours: str
    released: tuple[str, ...]
    to_ours: Callable[[Tensors], torch.Tensor]
    to_released: Callable[[torch.Tensor], Tensors]


def _same(ts: Tensors) -> torch.Tensor:
    return ts[0]


def _one(t: torch.Tensor) -> Tensors:
    return [t]


def _grouped_qkv(groups: int, q_rows: int, kv_rows: int):
    """(q, k, v) <-> megatron's ``linear_qkv`` rows: per group ``[q_g | k_g | v_g]``.

    ``q_rows``/``kv_rows``: rows of q and of k (= v) per group (heads x head_dim). Works for
    weights ``[rows, in]`` and biases ``[rows]``."""

    def to_ours(ts: Tensors) -> torch.Tensor:
        q, k, v = ts
        rest = q.shape[1:]
        parts = [
            q.reshape(groups, q_rows, *rest),
            k.reshape(groups, kv_rows, *rest),
            v.reshape(groups, kv_rows, *rest),
        ]
        return torch.cat(parts, dim=1).reshape(-1, *rest)

    def to_released(t: torch.Tensor) -> Tensors:
        rest = t.shape[1:]
        q, k, v = t.reshape(groups, q_rows + 2 * kv_rows, *rest).split(
            [q_rows, kv_rows, kv_rows], dim=1
        )
        return [x.reshape(-1, *rest) for x in (q, k, v)]

    return to_ours, to_released


def _fused_qkv(heads: int, head_dim: int):
    """RADIO's ``attn.qkv`` ``[q; k; v]`` <-> megatron's per-head ``[q_h | k_h | v_h]``."""
    grouped_to_ours, grouped_to_released = _grouped_qkv(heads, head_dim, head_dim)

    def to_ours(ts: Tensors) -> torch.Tensor:
        return grouped_to_ours(list(ts[0].chunk(3, dim=0)))

    def to_released(t: torch.Tensor) -> Tensors:
        return [torch.cat(grouped_to_released(t), dim=0)]

    return to_ours, to_released


@dataclass(frozen=True)
class Prefixes:
    """Where each component sits in a released checkpoint (the omni model's prefixes, or ""
    for a checkpoint of that component alone)."""

    llm: str = "language_model."
    vision: str = "vision_model."
    audio: str = "sound_encoder.encoder."

    @classmethod
    def alone(cls, component: str, audio_prefix: str = "") -> Prefixes:
        return {
            "llm": cls(llm=""),
            "vision_encoder": cls(vision=""),
            "audio_encoder": cls(audio=audio_prefix),
        }[component]


_MAMBA = (
    r"(in_proj\.weight|conv1d\.weight|conv1d\.bias|dt_bias|A_log|D|norm\.weight|out_proj\.weight)"
)
_AUDIO_ATTN = {
    "linear_q": "q_proj",
    "linear_k": "k_proj",
    "linear_v": "v_proj",
    "linear_out": "o_proj",
    "linear_pos": "relative_k_proj",
}


def rule_for(key: str, model: dict, prefixes: Prefixes) -> Rule | None:
    """The rule of one omni-train state-dict key (``model``: the config's model section as a
    dict). None for keys with no tensor (TE ``_extra_state``); an unknown key is an error."""
    if key.endswith("._extra_state"):
        return None

    def rename(name: str) -> Rule:
        return Rule(key, (name,), _same, _one)

    lm = f"{prefixes.llm}backbone."
    layer = r"llm\.decoder\.layers\.(\d+)\."
    if key == "llm.embedding.word_embeddings.weight":
        return rename(f"{lm}embeddings.weight")
    if key == "llm.output_layer.weight":
        return rename(f"{prefixes.llm}lm_head.weight")
    if key == "llm.decoder.final_norm.weight":
        return rename(f"{lm}norm_f.weight")
    if m := re.fullmatch(
        layer + r"(?:mixer\.in_proj|self_attention\.linear_qkv|mlp\.linear_fc1)"
        r"\.layer_norm_weight|" + layer + r"pre_mlp_layernorm\.weight",
        key,
    ):
        i = m.group(1) or m.group(2)
        return rename(f"{lm}layers.{i}.norm.weight")
    if m := re.fullmatch(layer + r"mixer\." + _MAMBA, key):
        return rename(f"{lm}layers.{m.group(1)}.mixer.{m.group(2)}")
    if m := re.fullmatch(layer + r"self_attention\.linear_qkv\.weight", key):
        base = f"{lm}layers.{m.group(1)}.mixer."
        groups, hd = model["num_query_groups"], model["head_dim"]
        q_rows = model["num_attention_heads"] // groups * hd
        to_ours, to_released = _grouped_qkv(groups, q_rows, hd)
        names = tuple(f"{base}{x}_proj.weight" for x in "qkv")
        return Rule(key, names, to_ours, to_released)
    if m := re.fullmatch(layer + r"self_attention\.linear_proj\.weight", key):
        return rename(f"{lm}layers.{m.group(1)}.mixer.o_proj.weight")
    if m := re.fullmatch(layer + r"mlp\.router\.(weight|expert_bias)", key):
        name = "weight" if m.group(2) == "weight" else "e_score_correction_bias"
        return rename(f"{lm}layers.{m.group(1)}.mixer.gate.{name}")
    if m := re.fullmatch(
        layer + r"mlp\.experts\.local_experts\.(\d+)\.linear_fc(1|2)\.weight", key
    ):
        proj = "up_proj" if m.group(3) == "1" else "down_proj"
        return rename(f"{lm}layers.{m.group(1)}.mixer.experts.{m.group(2)}.{proj}.weight")
    if m := re.fullmatch(layer + r"mlp\.(shared_experts\.)?linear_fc(1|2)\.weight", key):
        proj = "up_proj" if m.group(3) == "1" else "down_proj"
        shared = "shared_experts." if m.group(2) else ""
        return rename(f"{lm}layers.{m.group(1)}.mixer.{shared}{proj}.weight")

    vit = f"{prefixes.vision}radio_model.model."
    gen = f"{vit}patch_generator."
    vision_names = {
        "vision_encoder.class_token": f"{gen}cls_token.token",
        "vision_encoder.position_embeddings": f"{gen}pos_embed",
        "vision_encoder.embedder.weight": f"{gen}embedder.weight",
        "vision_encoder.video_embedder.weight": f"{gen}video_embedder.weight",
    }
    if key in vision_names:
        return rename(vision_names[key])
    block = r"vision_encoder\.decoder\.layers\.(\d+)\."
    if m := re.fullmatch(block + r"self_attention\.linear_qkv\.(weight|bias)", key):
        v = model["vision"]
        heads = v["num_attention_heads"]
        to_ours, to_released = _fused_qkv(heads, v["hidden_size"] // heads)
        return Rule(key, (f"{vit}blocks.{m.group(1)}.attn.qkv.{m.group(2)}",), to_ours, to_released)
    block_names = {
        r"self_attention\.linear_qkv\.layer_norm_(weight|bias)": "norm1.{}",
        r"self_attention\.linear_proj\.(weight|bias)": "attn.proj.{}",
        r"mlp\.linear_fc1\.layer_norm_(weight|bias)": "norm2.{}",
        r"mlp\.linear_fc1\.(weight|bias)": "mlp.fc1.{}",
        r"mlp\.linear_fc2\.(weight|bias)": "mlp.fc2.{}",
    }
    for pattern, name in block_names.items():
        if m := re.fullmatch(block + pattern, key):
            return rename(f"{vit}blocks.{m.group(1)}.{name.format(m.group(2))}")

    projector_names = {
        "vision_projector.encoder.linear_fc1.layer_norm_weight": "mlp1.0.weight",
        "vision_projector.encoder.linear_fc1.weight": "mlp1.1.weight",
        "vision_projector.encoder.linear_fc2.weight": "mlp1.3.weight",
        "audio_projector.encoder.linear_fc1.layer_norm_weight": "sound_projection.norm.weight",
        "audio_projector.encoder.linear_fc1.weight": "sound_projection.linear1.weight",
        "audio_projector.encoder.linear_fc2.weight": "sound_projection.linear2.weight",
    }
    if key in projector_names:
        return rename(projector_names[key])

    audio = prefixes.audio
    enc = r"audio_encoder\.encoder\."
    if m := re.fullmatch(enc + r"pre_encode\.conv\.(\d+)\.(weight|bias)", key):
        return rename(f"{audio}subsampling.layers.{m.group(1)}.{m.group(2)}")
    if m := re.fullmatch(enc + r"pre_encode\.out\.(weight|bias)", key):
        return rename(f"{audio}subsampling.linear.{m.group(1)}")
    if m := re.fullmatch(enc + r"layers\.(\d+)\.self_attn\.(linear_\w+)\.(weight|bias)", key):
        return rename(
            f"{audio}layers.{m.group(1)}.self_attn.{_AUDIO_ATTN[m.group(2)]}.{m.group(3)}"
        )
    if m := re.fullmatch(enc + r"layers\.(\d+)\.self_attn\.pos_bias_(u|v)", key):
        return rename(f"{audio}layers.{m.group(1)}.self_attn.bias_{m.group(2)}")
    if m := re.fullmatch(enc + r"layers\.(\d+)\.conv\.batch_norm\.(\w+)", key):
        return rename(f"{audio}layers.{m.group(1)}.conv.norm.{m.group(2)}")
    if m := re.fullmatch(enc + r"layers\.(\d+)\.((?:feed_forward\d|norm_\w+|conv)\..+)", key):
        return rename(f"{audio}layers.{m.group(1)}.{m.group(2)}")
    raise KeyError(
        f"no released name for omni-train weight {key}; omni_train/hf/weights.py "
        "does not know this layer"
    )


# ---- released tensors that have no omni-train weight ------------------------------------------

# (pattern, what to do): "ignore" (documented why), "ones" (must be all ones: an identity factor
# omni-train does not have), "refuse" (a part omni-train does not build: never dropped silently).
EXTRA = (
    (r"(.*\.)?radio_model\.summary_idxs", "ignore"),  # which cls tokens form RADIO's summary
    (r"(.*\.)?radio_model\.input_conditioner\.norm_(mean|std)", "ignore"),  # pixel norm: data
    (r"(.*\.)?feature_extractor\..*", "ignore"),  # Parakeet's mel filterbank: the preprocessor
    (r"(.*\.)?blocks\.\d+\.layer_scale\d\.lambda1", "ones"),  # C-RADIO: LayerScale of 1
    (r"(ctc_head|decoder|joint)\..*", "ignore"),  # a Parakeet ASR checkpoint's heads
    (r"preprocessor\..*", "ignore"),  # a .nemo's mel featurizer buffers (recomputed)
    (r"(.*\.)?mtp\..*", "refuse"),  # multi-token prediction layers
)


def classify_extra(name: str) -> str | None:
    for pattern, action in EXTRA:
        if re.fullmatch(pattern, name):
            return action
    return None


# ---- transformers' current in-memory names -> released names -------------------------------

_CURRENT_RENAMES = (  # (current, released), as transformers 5.23's conversion_mapping.py
    (r"^language_model\.model\.", "language_model.backbone."),
    (r"^model\.", "backbone."),  # a NemotronHForCausalLM alone
    (r"^multi_modal_projector\.layer_norm\.", "mlp1.0."),
    (r"^multi_modal_projector\.linear_1\.", "mlp1.1."),
    (r"^multi_modal_projector\.linear_2\.", "mlp1.3."),
    (r"^audio_tower\.", "sound_encoder.encoder."),
    (r"^embed_audio\.layer_norm\.", "sound_projection.norm."),
    (r"^embed_audio\.linear_1\.", "sound_projection.linear1."),
    (r"^embed_audio\.linear_2\.", "sound_projection.linear2."),
    (r"embeddings\.video_patch_projection", "radio_model.model.patch_generator.video_embedder"),
    (r"embeddings\.patch_projection", "radio_model.model.patch_generator.embedder"),
    (r"embeddings\.position_embedding", "radio_model.model.patch_generator.pos_embed"),
    (r"embeddings\.cls_register_token", "radio_model.model.patch_generator.cls_token.token"),
    (r"encoder\.layer\.", "radio_model.model.blocks."),
    (r"attention\.o_proj", "attn.proj"),
    (r"(^|\.)input_conditioner\.", r"\1radio_model.input_conditioner."),
    (r"(^|\.)summary_idxs$", r"\1radio_model.summary_idxs"),
)
_CURRENT_MARKERS = (
    "language_model.model.",
    "multi_modal_projector.",
    "audio_tower.",
    "embed_audio.",
    "model.layers.",
    "embeddings.patch_projection.weight",
)


def is_current_naming(keys: list[str]) -> bool:
    return any(k.startswith(m) or k.endswith(m) for k in keys for m in _CURRENT_MARKERS)


class CurrentNames:
    """A checkpoint with transformers' in-memory names, presented under the released names:
    renames, per-expert views of the merged ``experts.up_proj``/``down_proj`` ``[E, out, in]``
    and RADIO's q/k/v concatenated into ``attn.qkv``."""

    def __init__(self, source):
        self._source = source
        self._make: dict[str, Callable[[], torch.Tensor]] = {}
        qkv: dict[str, dict[str, str]] = {}
        for key in source.keys():  # noqa: SIM118 (a reader, not a dict)
            if m := re.fullmatch(r"(.*\.mixer\.experts)\.(up_proj|down_proj)", key):
                name = key
                for old, new in _CURRENT_RENAMES:
                    name = re.sub(old, new, name)
                base = name.rsplit(".", 1)[0]
                for e in range(source.shape(key)[0]):
                    out = f"{base}.{e}.{m.group(2)}.weight"
                    self._make[out] = lambda key=key, e=e: self._source.get(key)[e]
                continue
            name = key
            for old, new in _CURRENT_RENAMES:
                name = re.sub(old, new, name)
            if m := re.fullmatch(
                r"(.*\.blocks\.\d+)\.attention\.(q|k|v)_proj\.(weight|bias)", name
            ):
                qkv.setdefault(f"{m.group(1)}.attn.qkv.{m.group(3)}", {})[m.group(2)] = key
                continue
            self._make[name] = lambda key=key: self._source.get(key)
        for name, parts in qkv.items():
            if sorted(parts) != ["k", "q", "v"]:
                raise ValueError(f"{name}: the checkpoint has only {sorted(parts)} of q/k/v")
            keys = [parts[x] for x in "qkv"]
            self._make[name] = lambda keys=keys: torch.cat([self._source.get(k) for k in keys])

    def keys(self) -> list[str]:
        return list(self._make)

    def __contains__(self, name: str) -> bool:
        return name in self._make

    def get(self, name: str) -> torch.Tensor:
        return self._make[name]()
