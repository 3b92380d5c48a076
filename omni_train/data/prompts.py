"""A conversation -> the prompt a model generates its answer from (``omni-train generate``).

The conversation up to its **last assistant turn** is the prompt; that turn's text is kept as
the reference answer (None when the conversation has no assistant turn: all of it is the
prompt). The prompt is laid out as training lays a sample out (same chat template, placeholders,
media plans and decoding, :mod:`omni_train.data.chat`), then ends with the template's opening of
an assistant reply (``add_generation_prompt``). Unlike training, nothing needs to be learnable,
so the prompt never hits the "nothing left to learn" rule; a prompt over the context length is
refused (``too_long``), never truncated.
"""

from __future__ import annotations

from omni_train.data.chat import layout
from omni_train.data.conversation import SampleError, parse_conversation
from omni_train.data.task_encoder import Conversation, OmniSample, OmniTaskEncoder


def encode_prompt(encoder: OmniTaskEncoder, sample: Conversation) -> tuple[OmniSample, str | None]:
    """(the prompt as an :class:`OmniSample`: ``tokens`` ``[P]`` and its decoded media; the
    loss flags of earlier assistant turns are kept but mean nothing here), the reference
    answer text or None. Raises SampleError."""
    turns = parse_conversation(sample.conversation, set(sample.members), require_assistant=False)
    last = max((i for i, t in enumerate(turns) if t.role == "assistant"), default=None)
    answer = None
    if last is not None:
        answer = "\n".join(p.text for p in turns[last].parts if p.kind == "text")
        turns = turns[:last]
    if not turns:
        raise SampleError("bad_content", "nothing precedes the last assistant turn")
    parts = [p for t in turns for p in t.parts if p.kind != "text"]
    plans = [encoder._plan(sample, part) for part in parts]
    lay = layout(turns, plans, encoder.tok, encoder.layout, generation_prompt=True)
    if lay.num_tokens > encoder.context_length:
        raise SampleError(
            "too_long",
            f"the prompt's {lay.num_tokens} tokens exceed the context length "
            f"{encoder.context_length}",
        )
    # decoding reads only the members of ``parts``: media of dropped turns stay undecoded
    return encoder.decode(encoder.planned(sample, parts, plans, lay)), answer
