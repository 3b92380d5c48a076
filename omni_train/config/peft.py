"""PEFT config: LoRA adapters, by named target groups and module-name patterns (issue #38).

A group names the linears of one kind in the model (``omni_train.model.lora`` matches them by
the module names the model declares); ``patterns`` add modules by regular expression over
module names (``re.fullmatch``). What a stage trains: a component in ``stage.trainable`` with
adapters trains its adapters only (its base weights frozen); one without adapters trains
whole (the projectors, in the usual LoRA recipe); a target inside a component the stage keeps
frozen is an error (``omni_train.model.lora.apply_lora`` says which and how to fix it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from omni_train.config.checks import positive

_LAYER = r"llm\.decoder\.layers\.\d+"
_VIT = r"vision_encoder\.decoder\.layers\.\d+"
_CONFORMER = r"audio_encoder\.encoder\.layers\.\d+"

# group -> module-name regular expressions (re.fullmatch), over OmniModel.named_modules()
LORA_GROUPS: dict[str, tuple[str, ...]] = {
    "lm_attention": (rf"{_LAYER}\.self_attention\.linear_(qkv|proj)",),
    "lm_mamba": (rf"{_LAYER}\.mixer\.(in_proj|out_proj)",),
    "lm_experts": (rf"{_LAYER}\.mlp\.experts\.local_experts\.\d+\.linear_fc[12]",),
    "lm_shared_expert": (rf"{_LAYER}\.mlp\.shared_experts\.linear_fc[12]",),
    "lm_mlp": (rf"{_LAYER}\.mlp\.linear_fc[12]",),
    "vision_blocks": (
        rf"{_VIT}\.self_attention\.linear_(qkv|proj)",
        rf"{_VIT}\.mlp\.linear_fc[12]",
    ),
    "audio_blocks": (
        rf"{_CONFORMER}\.feed_forward[12]\.linear[12]",
        rf"{_CONFORMER}\.self_attn\.linear_(q|k|v|out)",
    ),
    "projectors": (r"(vision|audio)_projector\.encoder\.linear_fc[12]",),
}
# the component each group's modules belong to (the first part of their names)
GROUP_COMPONENTS: dict[str, tuple[str, ...]] = {
    **{g: ("llm",) for g in LORA_GROUPS if g.startswith("lm_")},
    "vision_blocks": ("vision_encoder",),
    "audio_blocks": ("audio_encoder",),
    "projectors": ("vision_projector", "audio_projector"),
}
# what the usual LLM LoRA recipe adapts (Megatron-Bridge's: attention, Mamba and MLP linears)
COMPONENTS = ("llm", "vision_encoder", "vision_projector", "audio_encoder", "audio_projector")
LM_GROUPS = ("lm_attention", "lm_mamba", "lm_experts", "lm_shared_expert")
METHODS = ("none", "lora")


@dataclass
class PeftConfig:
    """``method: lora`` adds rank-``rank`` adapters ``B A`` (scaled by ``alpha / rank``, B
    zero-initialised, dropout on their input) beside every targeted linear; ``none``: full
    fine-tuning as ``stage.trainable`` says."""

    method: str = "none"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=list)  # names of LORA_GROUPS
    patterns: list[str] = field(default_factory=list)  # more modules, by regular expression

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"peft.method={self.method!r}; valid: {', '.join(METHODS)}")
        positive("peft", rank=self.rank, alpha=self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"peft.dropout={self.dropout} must be in [0, 1)")
        unknown = sorted(set(self.targets) - set(LORA_GROUPS))
        if unknown:
            raise ValueError(
                f"peft.targets names unknown groups {unknown}; valid: {', '.join(LORA_GROUPS)} "
                "(or peft.patterns=[REGEX] for module names)"
            )
        if self.method == "lora" and not (self.targets or self.patterns):
            raise ValueError(
                "peft.method=lora without peft.targets or peft.patterns adapts nothing; e.g. "
                f"peft.targets=[{','.join(LM_GROUPS)}]"
            )

    @property
    def enabled(self) -> bool:
        return self.method == "lora"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def components(self) -> tuple[str, ...]:
        """The components that get adapters (their base weights then get no gradient): those of
        the groups, and of each pattern that starts with a component's name (a pattern that
        does not is assumed to adapt nothing here: FLOPs then count its weight gradients)."""
        if not self.enabled:
            return ()
        found = {c for g in self.targets for c in GROUP_COMPONENTS[g]}
        for pattern in self.patterns:
            head = re.match(r"\(?([a-z_]+)\)?(?:\\\.|\.)", pattern)
            if head and head.group(1) in COMPONENTS:
                found.add(head.group(1))
        return tuple(sorted(found))
