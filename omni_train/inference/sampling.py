"""Choosing the next token from the logits: greedy, or sampled with temperature, top-k and
top-p, with transformers' semantics (``TemperatureLogitsWarper`` -> ``TopKLogitsWarper`` ->
``TopPLogitsWarper``, in that order, as ``generate`` applies them).

Hand-written: megatron-core's ``sample_from_logits`` is a method of its CUDA text-generation
controller. Sampling draws from an explicit ``torch.Generator`` seeded the same on every rank,
on logits every rank holds in full (gathered over TP), so every rank picks the same token and
the ranks stay in lockstep without a broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0``: greedy (argmax; top-k and top-p are then unused). ``top_k = 0``
    and ``top_p = 1``: no such filter. ``max_new_tokens``: the most tokens a row generates;
    a row stops earlier at any of ``stop_ids`` (the stop token is kept in its output)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(
                f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got {self.temperature}, "
                f"{self.top_k}, {self.top_p}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def generator(cfg: SamplingConfig) -> torch.Generator:
    """A CPU generator seeded with ``cfg.seed``: the same stream on every rank."""
    return torch.Generator().manual_seed(cfg.seed)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``[b, V]`` logits with all but the ``k`` largest per row set to -inf (``k = 0``: all
    kept), as ``TopKLogitsWarper``."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """``[b, V]`` logits keeping the smallest set of most likely tokens whose probability adds
    up to at least ``p`` (at least one token), the rest -inf, as ``TopPLogitsWarper``: sorted
    ascending, a token goes if the cumulative probability up to it is ``<= 1 - p``."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= 1 - p
    remove[..., -1:] = False  # the most likely token always stays
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def sample(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator) -> torch.Tensor:
    """The next token ``[b]`` (int64) from ``logits`` ``[b, V]`` (the whole vocabulary)."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    scores = top_p_filter(top_k_filter(logits.float() / cfg.temperature, cfg.top_k), cfg.top_p)
    probs = scores.softmax(dim=-1)
    # drawn on the CPU: the generator is a CPU one, identical on every rank
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)
