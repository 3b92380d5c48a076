"""LoRA adapters on megatron-core's parallel linears and the conformer's linears (issue #38).

Beside every targeted linear ``y = W x`` (``W`` [out, in]) an adapter adds
``(alpha / r) * B A dropout(x)`` with ``A`` [r, in] and ``B`` [out, r], ``B`` zero at the start
(the model's outputs are unchanged until it trains). The base keeps its parameter names and
shapes (``<linear>.weight``); the adapter's are ``<linear>.lora.A`` and ``<linear>.lora.B``.

Sharding follows the base weight, with the low-rank side replicated (the design of
Megatron-Bridge's ``ParallelLinearAdapter``, written here for megatron-core 0.16 on the CPU
platform; Megatron-Bridge itself needs Python >= 3.12, a newer megatron-core and imports
Transformer Engine):

- **column-parallel** base (``W`` split on ``out`` over its TP group): ``B`` split the same way,
  ``A`` whole on every rank. The input is the base's own (after its fused norm), gathered
  from the sequence-parallel region under SP; the gradient of ``A`` is summed over the group
  (each rank holds one slice of ``B``'s rows).
- **row-parallel** base (``W`` split on ``in``): ``A`` split on ``in``, ``B`` whole. The
  low-rank activations ``A x`` are summed over the group, then ``B`` runs on every rank; under
  SP its output is scattered to the sequence region as the base's is.
- **expert** linears (``is_expert``, their TP group the expert-TP group): the token dispatcher
  does their communication, so the adapter adds none in the forward; a row-parallel expert's
  ``B`` gets its gradient summed over the group instead (the partial sums go out unreduced, as
  the base's do).
- plain ``torch.nn.Linear`` (the conformer, not TP-parallel): ``A`` and ``B`` whole.

What has run: the CPU platform (megatron-core's own parallel linears and our fused-norm
stand-in): 1 process, TP 2 + SP, EP 2, CP 2. Transformer Engine's linears have no adapters: on a
GPU a stage with ``peft`` turns TE's layers off (``OMNI_TRAIN_TRANSFORMER_ENGINE=off``, set by
the stage runner) and builds these, the "CUDA without TE" path, which has not run on a GPU.
"""

from __future__ import annotations

import contextlib
import math
import re
import zlib
from collections.abc import Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from omni_train.config.peft import LORA_GROUPS, PeftConfig
from omni_train.model.freeze import stop_expert_bias_updates

__all__ = [
    "LoRAAdapter",
    "adapter_requests",
    "apply_lora",
    "lora_targets",
    "merge_saved_adapters",
    "saved_adapters",
]


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; the gradient summed over ``group`` (a weight whose gradient each rank
    holds only a part of)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _kind(module: torch.nn.Module) -> str:
    if type(module).__name__.startswith("TE"):
        raise ValueError(
            f"LoRA on Transformer Engine's {type(module).__name__} is not implemented; a stage "
            "with peft builds megatron-core's own linears (OMNI_TRAIN_TRANSFORMER_ENGINE=off, "
            "which omni-train run sets): build this model the same way"
        )
    if isinstance(module, ColumnParallelLinear):
        return "column"
    if isinstance(module, RowParallelLinear):
        return "row"
    if type(module) is torch.nn.Linear:
        return "plain"
    raise ValueError(
        f"LoRA adapts linear layers only (megatron-core's column / row parallel linears and "
        f"torch.nn.Linear), never a router or a norm; this one is a {type(module).__name__}"
    )


class LoRAAdapter(torch.nn.Module):
    """The adapter of one base linear: parameters ``A`` and ``B`` (this rank's shards, see the
    module docstring) and the low-rank path. Shapes: input as the base's, output as the
    base's output."""

    def __init__(
        self,
        base: torch.nn.Module,
        name: str,
        peft: PeftConfig,
        seed: int,
        row_sections: list[tuple[str, int]] | None = None,
    ):
        super().__init__()
        self.kind = _kind(base)
        # a fused base whose checkpoint stores its rows as separately sharded parts (Mamba's
        # in_proj: z, x, B, C, dt): B's rows are saved the same way, so B reshards as W does
        self.row_sections = row_sections
        self.scale = peft.scale
        self.dropout = torch.nn.Dropout(peft.dropout) if peft.dropout else torch.nn.Identity()
        out_features, in_features = self._global_shape(base)
        group = getattr(base, "tp_group", None)
        self.group = group if group is not None and group.size() > 1 else None
        self.expert = bool(getattr(base, "is_expert", False))
        tp = self.group.size() if self.group is not None else 1
        rank = self.group.rank() if self.group is not None else 0
        # the whole A from a generator of its own (the same on every rank and layout), sliced
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        a = torch.empty(peft.rank, in_features)
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform(a=sqrt(5)), as PEFT's LoRA
        a.uniform_(-bound, bound, generator=gen)
        b_rows = out_features
        if self.kind == "row" and tp > 1:
            a = a.chunk(tp, dim=1)[rank].contiguous()
        if self.kind == "column" and tp > 1:
            b_rows = out_features // tp
        weight = base.weight
        self.A = torch.nn.Parameter(a.to(weight.device, weight.dtype))
        self.B = torch.nn.Parameter(torch.zeros(b_rows, peft.rank, device=weight.device,
                                                dtype=weight.dtype))  # fmt: skip
        allreduce = getattr(weight, "allreduce", True)
        for p, split_dim in ((self.A, 1 if self.kind == "row" else None),
                             (self.B, 0 if self.kind == "column" else None)):  # fmt: skip
            p.allreduce = allreduce  # expert adapters reduce over the expert-DP group
            if split_dim is not None and tp > 1:
                p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, split_dim, 1

    @staticmethod
    def _global_shape(base) -> tuple[int, int]:
        if type(base) is torch.nn.Linear:
            return base.out_features, base.in_features
        return base.output_size, base.input_size

    def _weight(self, p: torch.Tensor) -> torch.Tensor:
        return _SumGradOverGroup.apply(p, self.group)

    def column(self, x: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
        """``x`` [s/tp (SP) or s, b, in] (the base's normalised input) -> [s, b, out/tp]."""
        a = self.A
        if self.group is not None:
            if not self.expert and sequence_parallel:
                x = gather_from_sequence_parallel_region(x, group=self.group)
            elif not self.expert:
                x = copy_to_tensor_model_parallel_region(x, self.group)
            a = self._weight(a)
        h = torch.nn.functional.linear(self.dropout(x), a)
        return torch.nn.functional.linear(h, self.B) * self.scale

    def row(self, x: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
        """``x`` [s, b, in/tp] -> [s/tp (SP) or s, b, out] (experts: this rank's partial sum)."""
        h = torch.nn.functional.linear(self.dropout(x), self.A)
        b = self.B
        if self.group is not None:
            if self.expert:
                b = self._weight(b)
            else:
                h = reduce_from_tensor_model_parallel_region(h, self.group)
        y = torch.nn.functional.linear(h, b) * self.scale
        if self.group is not None and not self.expert and sequence_parallel:
            y = scatter_to_sequence_parallel_region(y, group=self.group)
        return y

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(torch.nn.functional.linear(self.dropout(x), self.A),
                                          self.B) * self.scale  # fmt: skip

    def delta(self) -> torch.Tensor:
        """``alpha / r * B A`` on this rank's shard of the base weight: [out/tp, in]
        (column), [out, in/tp] (row) or [out, in]; fp32."""
        return self.scale * (self.B.float() @ self.A.float())

    def sharded_state(self, prefix: str, sharded_offsets=(), groups=(None, None)) -> dict:
        """``<prefix>A`` and ``<prefix>B`` as sharded tensors: the split factor on the base's TP
        axis, the other replicated; B's rows in the base's parts (``row_sections``).
        ``groups``: the (TP, DP x CP) groups the base's own sharded state uses (an expert's
        TP group is the expert-TP group); (None, None): megatron's defaults."""
        axis = {}
        if self.group is not None:
            axis = {"row": {"A": 1}, "column": {"B": 0}}.get(self.kind, {})
        own = self.state_dict(prefix="", keep_vars=True)
        tp_group, dp_cp_group = groups
        out = make_sharded_tensors_for_checkpoint(
            own, prefix, axis, sharded_offsets, tp_group=tp_group, dp_cp_group=dp_cp_group
        )
        if self.row_sections:
            # lazy: megatron's mamba_mixer module imports Triton's kernels unless the platform's
            # patches ran first (they have, once a model with Mamba layers exists)
            from megatron.core.ssm.mamba_mixer import _split_tensor_factory

            names, sizes = zip(*self.row_sections, strict=True)
            out[f"{prefix}B"] = _split_tensor_factory(
                out[f"{prefix}B"], list(sizes), list(names), 0
            )
        return out


def _column_forward(self, input_, weight=None, runtime_gather_output=None):
    """A column-parallel base with its adapter (bound as the module's ``forward``)."""
    x = self.normalize(input_) if hasattr(self, "normalize") else input_
    out, bias = ColumnParallelLinear.forward(self, x, weight, runtime_gather_output)
    extra = self.lora.column(x, self.sequence_parallel)
    if extra.shape[-1] != out.shape[-1]:  # the base gathered its output
        extra = gather_from_tensor_model_parallel_region(extra, group=self.tp_group)
    return out + extra.to(out.dtype), bias


def _row_forward(self, input_):
    out, bias = RowParallelLinear.forward(self, input_)
    return out + self.lora.row(input_, self.sequence_parallel).to(out.dtype), bias


def _plain_forward(self, input_):
    return torch.nn.Linear.forward(self, input_) + self.lora.plain(input_)


_FORWARDS = {"column": _column_forward, "row": _row_forward, "plain": _plain_forward}


def _sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
    """The base's sharded state (weight, bias; a fused norm's weight) plus the adapter's: a
    split factor sharded on the base's TP axis, the other replicated."""
    out = type(self).sharded_state_dict(self, prefix, sharded_offsets, metadata)
    out = {k: v for k, v in out.items() if not k.startswith(f"{prefix}lora.")}
    groups = (None, None)
    if getattr(self, "tp_group", None) is not None:  # as megatron's linears shard their weight
        dp_cp = (metadata or {}).get("dp_cp_group")
        if dp_cp is None:
            dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
        groups = (self.tp_group, dp_cp)
    out.update(self.lora.sharded_state(f"{prefix}lora.", sharded_offsets, groups))
    return out


_LOCAL_EXPERT = re.compile(r"(.*\.experts)\.local_experts\.(\d+)(\..*)")


def _global_name(model_modules: dict, name: str) -> str:
    """``name`` with a routed expert's local index made global (this EP rank's first expert
    plus the local one): the name A's generator is seeded with, so every EP layout starts from
    the same adapters."""
    m = _LOCAL_EXPERT.fullmatch(name)
    experts = model_modules.get(m.group(1)) if m else None
    if experts is None or not hasattr(experts, "ep_group"):
        return name
    first = experts.ep_group.rank() * experts.num_local_experts
    return f"{m.group(1)}.local_experts.{first + int(m.group(2))}{m.group(3)}"


_MAMBA_MIXERS = ("MambaMixer", "ClampedDtMambaMixer")  # by name: see sharded_state's import


def _row_sections(model_modules: dict, name: str) -> list[tuple[str, int]] | None:
    """The parts Mamba's in_proj is checkpointed in (megatron-core's MambaMixer splits its
    rows into z, x, B, C, dt, each sharded over TP on its own), this rank's sizes."""
    parent_name, _, child = name.rpartition(".")
    parent = model_modules.get(parent_name)
    if child != "in_proj" or type(parent).__name__ not in _MAMBA_MIXERS:
        return None
    groups = parent.ngroups_local_tp * parent.d_state
    return [("z", parent.d_inner_local_tp), ("x", parent.d_inner_local_tp), ("B", groups),
            ("C", groups), ("dt", parent.nheads_local_tp)]  # fmt: skip


def _attach(module: torch.nn.Module, adapter: LoRAAdapter) -> None:
    module.lora = adapter
    module.forward = _FORWARDS[adapter.kind].__get__(module)
    if hasattr(module, "sharded_state_dict"):
        module.sharded_state_dict = _sharded_state_dict.__get__(module)


def lora_targets(model: torch.nn.Module, peft: PeftConfig) -> dict[str, torch.nn.Module]:
    """{module name: module} that ``peft`` adapts in ``model``. Raises ValueError for a group
    or a pattern that matches nothing, and for a match that is not a linear layer."""
    modules = dict(model.named_modules())
    found: dict[str, torch.nn.Module] = {}
    wanted: list[tuple[str, Iterable[str]]] = [
        (f"peft.targets={g}", LORA_GROUPS[g]) for g in peft.targets
    ] + [(f"peft.patterns={p!r}", (p,)) for p in peft.patterns]
    for what, regexes in wanted:
        try:
            hits = [n for n in modules if any(re.fullmatch(r, n) for r in regexes)]
        except re.error as e:
            raise ValueError(f"{what} is not a regular expression: {e}") from e
        if not hits and what == "peft.targets=lm_mlp":
            raise ValueError(
                "peft.targets=lm_mlp matches no module: this model has no dense MLP layers "
                "(no '-' in model.hybrid_pattern); drop it from peft.targets"
            )
        if not hits:
            raise ValueError(
                f"{what} matches no module of this model; the groups are "
                f"{', '.join(LORA_GROUPS)}, and a pattern is a regular expression over module "
                "names (omni-train model summary lists the components)"
            )
        for n in hits:
            try:
                _kind(modules[n])
            except ValueError as e:
                raise ValueError(f"{what} matches {n}: {e}") from e
            found[n] = modules[n]
    return dict(sorted(found.items()))


def apply_lora(
    model: torch.nn.Module, peft: PeftConfig, trainable: list[str], seed: int
) -> dict[str, int]:
    """Add adapters to ``model`` (an ``OmniModel``; after freezing, before DDP) and freeze the
    base weights of every adapted component; returns {component: adapted linears}.

    A target inside a component ``trainable`` leaves frozen is an error: its adapters would
    train a tower the stage means to keep as it is."""
    targets = lora_targets(model, peft)
    outside = sorted({n.split(".", 1)[0] for n in targets} - set(trainable))
    if outside:
        raise ValueError(
            f"peft targets modules of {outside}, which stage.trainable={list(trainable)} keeps "
            f"frozen; add them to stage.trainable (their adapters then train, their base "
            f"weights stay frozen) or drop those targets"
        )
    adapted: dict[str, int] = {}
    modules = dict(model.named_modules())
    for name, module in targets.items():
        adapter = LoRAAdapter(module, _global_name(modules, name), peft, seed,
                              _row_sections(modules, name))  # fmt: skip
        _attach(module, adapter)
        component = name.split(".", 1)[0]
        adapted[component] = adapted.get(component, 0) + 1
    for component in adapted:
        for pname, p in getattr(model, component).named_parameters():
            p.requires_grad_(".lora." in f".{pname}")
        # the routers' expert bias is the base's too: not updated, so the stage's model stays
        # base + adapters (an adapter checkpoint does not hold it, and a merged or PEFT export
        # is exactly what trained)
        stop_expert_bias_updates(getattr(model, component))
    return adapted


@contextlib.contextmanager
def saved_adapters(model: torch.nn.Module, peft: PeftConfig):
    """Adapters of ``peft`` attached to ``model`` for as long as the context is open (to read
    a checkpoint's adapters through megatron's sharded state); yields {module name: module}.

    The targets are resolved again on this model, so any TP / EP layout reads what any other
    saved. The model's own adapters (a LoRA stage reading a LoRA checkpoint) are set aside
    meanwhile and come back as they were."""
    targets = lora_targets(model, peft)
    modules = dict(model.named_modules())
    kept = {}
    for name, module in targets.items():
        kept[name] = (module._modules.get("lora"), module.__dict__.get("sharded_state_dict"),
                      module.__dict__.get("forward"))  # fmt: skip
        _attach(module, LoRAAdapter(module, name, peft, 0, _row_sections(modules, name)))
    try:
        yield targets
    finally:
        for name, module in targets.items():
            lora, sharded, forward = kept[name]
            del module.lora
            for attr, value in (("sharded_state_dict", sharded), ("forward", forward)):
                module.__dict__.pop(attr, None)
                if value is not None:
                    setattr(module, attr, value)
            if lora is not None:
                module.lora = lora


def adapter_requests(model: torch.nn.Module, targets: dict) -> dict:
    """The sharded state of the adapters of ``targets`` (attached: :func:`saved_adapters`)."""
    return {k: v for k, v in model.sharded_state_dict().items()
            if k.rpartition(".lora.")[0] in targets}  # fmt: skip


@torch.no_grad()
def merge_saved_adapters(model: torch.nn.Module, peft: PeftConfig, load) -> list[str]:
    """Merge adapters a checkpoint holds (saved with ``peft``) into ``model``'s base weights,
    ``W += alpha / r * B A`` on each rank's shard (in fp32); returns the merged modules'
    names. ``load(request) -> {key: tensor}`` reads a sharded request from the checkpoint. The
    new stage trains fresh adapters (if any) on the merged weights."""
    with saved_adapters(model, peft) as targets:
        loaded = load(adapter_requests(model, targets))
        for name, module in targets.items():
            module.lora.A.copy_(loaded[f"{name}.lora.A"])
            module.lora.B.copy_(loaded[f"{name}.lora.B"])
            merged = module.weight.float() + module.lora.delta()
            module.weight.copy_(merged.to(module.weight.dtype))
    return list(targets)
