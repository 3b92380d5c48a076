"""A conversation plus media plans -> token ids and a loss mask, in one of two layouts.

Steps (the same for both layouts, ``data.layout``):

1. **Render** the turns through the tokenizer's chat template (:meth:`Tokenizer.render`). A
   turn's parts are joined by a newline; a media part renders as its placeholder string
   (``<image>``, ``<video>``, ``<so_embedding>``), exactly what a user types into the released
   processor's prompt. Assistant content is wrapped in two private-use sentinel characters
   before rendering, so its span is found in the template's output whatever the template adds
   around it; the sentinels are removed again.
2. **Expand** every placeholder the way the released processor
   (transformers 5.23 ``NemotronH_Omni_Reasoning_V3Processor``) does, with one placeholder
   token standing for each run:

   - image: ``<img><image></img>``;
   - video: per frame group (a tubelet, or one frame) ``Frame 1 sampled at 0.00 seconds and
     frame 2 sampled at 0.50 seconds: <img><image></img>``, groups joined by a newline (the
     image placeholder serves video; the release has no video token);
   - audio: ``<so_start><so_embedding><so_end>``.

   A video with audio: ``processor`` renders the audio as its own run after the video
   (``<video>`` newline ``<so_embedding>``, one encoder input for the whole track);
   ``report`` interleaves it in time: after each frame group, the audio tokens of the same
   time span in their own ``<so_start>...<so_end>`` run (the technical report's layout).
3. **Tokenize** the expanded text once, as the processor does, and widen each placeholder
   token into its run (placeholders are special tokens, which split the text, so this equals
   tokenizing the fully expanded text). Tokens inside an assistant span, and the end-of-turn
   token that closes it, carry loss; everything else does not.

The layout (:func:`layout`) is computed from media *metadata* only, so a sample's length is
known before any pixel is decoded. What differs between the layouts (a video's audio here, audio
clipping and video budgets in the task encoder) is decided by the layout object
(:mod:`omni_train.data.layouts`).
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

from omni_train.data.conversation import Part, SampleError, Turn
from omni_train.data.layouts import PROCESSOR, DataLayout
from omni_train.data.plans import AudioPlan, ImagePlan, Plan, VideoPlan
from omni_train.data.tokenizer import Tokenizer

# Private-use code points around assistant content while the template renders (never in data:
# a sample whose text holds them is refused).
_OPEN, _CLOSE = "\ue000", "\ue001"


@dataclass
class Layout:
    """A sample as text pieces and placeholder runs, in order; ``loss[i]`` marks loss pieces."""

    pieces: list[list[int] | tuple[int, int]] = field(default_factory=list)  # ids | (id, n)
    loss: list[bool] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)  # media part index per piece; -1: text

    def add(self, piece: list[int] | tuple[int, int], loss: bool, owner: int) -> None:
        self.pieces.append(piece)
        self.loss.append(loss)
        self.owner.append(owner)

    @property
    def num_tokens(self) -> int:
        return sum(len(p) if isinstance(p, list) else p[1] for p in self.pieces)

    def truncate(self, limit: int) -> tuple[Layout, int]:
        """The longest prefix of at most ``limit`` tokens that cuts only text: a media part
        (an image's run, a video's frame labels and runs, an audio run) is kept whole or not at
        all. Returns the prefix and how many media parts it keeps (parts come in order)."""
        out = Layout()
        used, kept, i = 0, 0, 0
        size = lambda p: len(p) if isinstance(p, list) else p[1]  # noqa: E731
        while i < len(self.pieces):
            part = self.owner[i]
            if part >= 0:
                j = i
                while j < len(self.pieces) and self.owner[j] == part:
                    j += 1
                n = sum(size(p) for p in self.pieces[i:j])
                if used + n > limit:
                    break
                for k in range(i, j):
                    out.add(self.pieces[k], self.loss[k], part)
                used, kept, i = used + n, part + 1, j
                continue
            piece = self.pieces[i]
            take = piece[: limit - used]
            if take:
                out.add(list(take), self.loss[i], -1)
                used += len(take)
            if len(take) < len(piece):
                break
            i += 1
        return out, kept

    def materialize(self) -> tuple[list[int], list[bool]]:
        """Token ids and, per token, whether it carries loss."""
        ids: list[int] = []
        loss: list[bool] = []
        for piece, on in zip(self.pieces, self.loss, strict=True):
            chunk = list(piece) if isinstance(piece, list) else [piece[0]] * piece[1]
            ids += chunk
            loss += [on] * len(chunk)
        return ids, loss


def frame_label(plan: VideoPlan, g: int) -> str:
    """The processor's text before frame group ``g`` (frames are numbered from 1)."""
    a, b = plan.group_frames(g)
    parts = [
        f"{'Frame' if f == a else 'frame'} {f + 1} sampled at {plan.label_seconds[f]:.2f} seconds"
        for f in range(a, b + 1)
    ]
    return " and ".join(parts) + ": "


def _part_text(part, plan: Plan, tok: Tokenizer, data_layout: DataLayout) -> str:
    """What a media part renders as in the prompt (before expansion)."""
    c = tok.cfg
    if isinstance(plan, ImagePlan):
        return c.image
    if isinstance(plan, AudioPlan):
        return c.audio
    if plan.audio_clips and data_layout.audio_after_video:
        return f"{c.video}\n{c.audio}"
    return c.video


def render(
    turns: list[Turn],
    plans: list[Plan],
    tok: Tokenizer,
    data_layout: DataLayout = PROCESSOR,
    generation_prompt: bool = False,
) -> str:
    """The prompt text: turns through the chat template, media as single placeholders, the
    assistant spans marked by the sentinels (:data:`_OPEN`/:data:`_CLOSE`); with
    ``generation_prompt`` the template's opening of the assistant's reply at the end."""
    todo = iter(plans)
    messages = []
    for turn in turns:
        texts = []
        for part in turn.parts:
            if part.kind == "text":
                bad = tok.media_strings_in(part.text)
                if bad or _OPEN in part.text or _CLOSE in part.text:
                    raise SampleError(
                        "placeholder_mismatch",
                        f"text contains media token strings {bad or ['(private-use U+E000/1)']}",
                    )
                texts.append(part.text)
            else:
                texts.append(_part_text(part, next(todo), tok, data_layout))
        content = "\n".join(texts)
        if turn.role == "assistant":
            content = _OPEN + content + _CLOSE
        messages.append({"role": turn.role, "content": content})
    if next(todo, None) is not None:
        raise AssertionError("more media plans than media parts")
    return tok.render(messages, generation_prompt)


def prompt(
    turns: list[Turn],
    plans: list[Plan],
    tok: Tokenizer,
    data_layout: DataLayout = PROCESSOR,
    generation_prompt: bool = False,
) -> str:
    """The text a user would hand the released processor for this sample: the chat template's
    output with one placeholder per media part (per video and its audio, in ``processor``)."""
    text = render(turns, plans, tok, data_layout, generation_prompt)
    return text.replace(_OPEN, "").replace(_CLOSE, "")


def _expansions(
    plans: list[Plan], tok: Tokenizer, data_layout: DataLayout
) -> list[tuple[str, str, list]]:
    """Per placeholder the prompt holds, in order: (placeholder string, expansion text with
    one placeholder per run, run sizes), and the media part it belongs to."""
    c = tok.cfg
    image_run = c.image_start + c.image + c.image_end
    audio_run = c.audio_start + c.audio + c.audio_end
    out = []
    for k, plan in enumerate(plans):
        if isinstance(plan, ImagePlan):
            out.append((c.image, image_run, [plan.num_tokens], k))
        elif isinstance(plan, AudioPlan):
            out.append((c.audio, audio_run, [plan.num_tokens], k))
        else:
            chunks = data_layout.video_audio_chunks(plan)
            text, runs = [], []
            for g in range(plan.num_groups):
                group = frame_label(plan, g) + image_run
                runs.append(plan.tokens_per_group)
                if chunks[g]:
                    group += audio_run
                    runs.append(chunks[g])
                text.append(group)
            out.append((c.video, "\n".join(text), runs, k))
            if plan.audio_clips and data_layout.audio_after_video:
                out.append((c.audio, audio_run, [plan.audio_tokens], k))
    return out


def layout(
    turns: list[Turn],
    plans: list[Plan],
    tok: Tokenizer,
    data_layout: DataLayout = PROCESSOR,
    generation_prompt: bool = False,
) -> Layout:
    """Lay out ``turns`` in ``data_layout``; ``plans`` holds one plan per media part, in part
    order. ``generation_prompt``: end with the opening of an assistant reply (a prompt to
    generate from; then usually no turn carries loss)."""
    prompt = render(turns, plans, tok, data_layout, generation_prompt)
    c = tok.cfg
    expected = _expansions(plans, tok, data_layout)
    # longest first, so that a placeholder containing another one matches whole
    strings = sorted({_OPEN, _CLOSE, c.image, c.video, c.audio}, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(s) for s in strings))
    # the expanded text as segments: (start offset, carries loss, media part or -1)
    text: list[str] = []
    starts: list[int] = []
    attrs: list[tuple[bool, int]] = []
    runs: list[int] = []
    length = 0

    def emit(s: str, loss: bool, owner: int) -> None:
        nonlocal length
        if s:
            text.append(s)
            starts.append(length)
            attrs.append((loss, owner))
            length += len(s)

    in_loss, close_turn, pos, k = False, False, 0, 0
    for m in pattern.finditer(prompt):
        plain = prompt[pos : m.start()]
        if close_turn and plain.startswith(c.im_end):  # the end-of-turn token learns too
            emit(c.im_end, True, -1)
            plain = plain[len(c.im_end) :]
        close_turn = False
        emit(plain, in_loss, -1)
        pos = m.end()
        token = m.group()
        if token in (_OPEN, _CLOSE):
            if in_loss == (token == _OPEN):
                raise SampleError("bad_content", "the chat template reorders assistant content")
            in_loss, close_turn = token == _OPEN, token == _CLOSE
            continue
        if k >= len(expected) or expected[k][0] != token:
            raise SampleError(
                "placeholder_mismatch",
                f"the chat template's output holds {token!r} where the media parts expect "
                f"{expected[k][0] if k < len(expected) else 'none'!r}",
            )
        _, expansion, sizes, part = expected[k]
        emit(expansion, False, part)
        runs += sizes
        k += 1
    plain = prompt[pos:]
    if close_turn and plain.startswith(c.im_end):
        emit(c.im_end, True, -1)
        plain = plain[len(c.im_end) :]
    emit(plain, in_loss, -1)
    if k != len(expected) or in_loss:
        raise SampleError(
            "placeholder_mismatch",
            f"the chat template's output holds {k} of the {len(expected)} media placeholders",
        )
    ids, offsets = tok.encode_with_offsets("".join(text))
    return _pieces(ids, offsets, starts, attrs, runs, tok)


def _pieces(ids, offsets, starts, attrs, runs, tok: Tokenizer) -> Layout:
    """Group tokens into text pieces of equal (loss, owner) and widen placeholders into runs."""
    out = Layout()
    placeholders = (tok.specials.image, tok.specials.audio)
    todo = iter(runs)
    current: list[int] = []
    key = None
    for tid, (a, b) in zip(ids, offsets, strict=True):
        # owner by the token's first character; loss by its last, so that a token which
        # carries the space before the answer (" A") learns the answer
        owner = attrs[bisect.bisect_right(starts, a) - 1][1]
        loss = attrs[bisect.bisect_right(starts, max(a, b - 1)) - 1][0]
        if tid in placeholders:
            if current:
                out.add(current, *key)
                current, key = [], None
            out.add((tid, next(todo)), False, owner)
            continue
        if key != (loss, owner) and current:
            out.add(current, *key)
            current = []
        key = (loss, owner)
        current.append(tid)
    if current:
        out.add(current, *key)
    if next(todo, None) is not None:
        raise AssertionError("placeholder runs left over: the tokenizer merged a placeholder")
    return out


def check_template(tok: Tokenizer, data_layout: DataLayout = PROCESSOR) -> None:
    """Start-up check: the chat template keeps one placeholder per media part and the
    assistant content in place (a probe conversation), so a template that cannot be used stops
    the job here with a fix, instead of skipping every sample."""
    probe = [
        Turn("user", (Part("text", text="What is shown?"), Part("image", member="a.png"))),
        Turn("assistant", (Part("text", text="A square."),)),
    ]
    try:
        ids, loss = layout(probe, [ImagePlan(2, 2)], tok, data_layout).materialize()
    except SampleError as e:
        raise ValueError(
            f"data.tokenizer.path={tok.cfg.path!r}: its chat template cannot lay out a "
            f"conversation ({e}); give the folder a template that renders each message's "
            "content string as it is (a chat_template.jinja beside tokenizer.json)"
        ) from None
    learned = tok.hf.decode([i for i, on in zip(ids, loss, strict=True) if on])
    if not learned.strip().startswith("A square."):
        raise ValueError(
            f"data.tokenizer.path={tok.cfg.path!r}: its chat template changes the assistant's "
            "text, so the loss cannot be placed on it; use a template that keeps it verbatim"
        )
