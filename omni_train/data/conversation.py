"""The on-disk sample: a conversation JSON member plus the media members it names.

Format (``docs/data_format.md`` has the full description and an example)::

    {"conversation": [
       {"role": "system", "content": "You are a helpful assistant."},
       {"role": "user", "content": [{"type": "text", "text": "What is shown?"},
                                    {"type": "image", "member": "img0.png"}]},
       {"role": "assistant", "content": "<think>...</think>A red square."}]}

``content`` is a string or a list of parts: ``text``, ``image``, ``video`` (``"audio": true``
takes the container's audio track, or names an audio member) and ``audio``. Every media member
of the sample is named by exactly one part.

A sample that cannot be used raises :class:`SampleError` with one of :data:`REASONS`; the task
encoder skips it and counts the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
MEDIA_KINDS = ("image", "video", "audio")

# Why a sample was skipped. Stable strings: they appear in logs and stage manifests.
REASONS = (
    "bad_json",  # the conversation member is missing or not valid JSON of this format
    "unknown_role",  # a turn's role is not system/user/assistant
    "bad_content",  # an unknown part type, a malformed part, or turn markers inside text
    "no_assistant_turn",  # nothing to learn from
    "missing_member",  # a part names a media member the sample does not have
    "placeholder_mismatch",  # media strings in text, or members no part (or two parts) name
    "undecodable_image",
    "undecodable_video",
    "undecodable_audio",
    "audio_too_short",  # shorter than the encoder takes (model.audio.min_seconds)
    "too_long",  # more tokens than the stage's context length
)


class SampleError(ValueError):
    """A bad sample: skipped and counted under ``reason`` (one of :data:`REASONS`)."""

    def __init__(self, reason: str, message: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class SkipLimitError(RuntimeError):
    """Too many bad samples (``data.max_skip_fraction``): the stage stops, its manifest says
    why."""


class NoUsableSampleError(SkipLimitError):
    """A data worker read ``data.skip_check_min_samples`` samples in a row and could use none:
    raised where it happens (in that rank's stream), not at the end of a step that never
    comes."""


@dataclass(frozen=True)
class Part:
    kind: str  # "text" | "image" | "video" | "audio"
    text: str = ""
    member: str = ""
    audio_member: str = ""  # video only: where its audio track comes from ("" for none)


@dataclass(frozen=True)
class Turn:
    role: str
    parts: tuple[Part, ...]


def parse_conversation(
    raw: bytes | None, members: set[str], require_assistant: bool = True
) -> list[Turn]:
    """Parse and check a conversation against the sample's ``members`` (member names).
    ``require_assistant=False``: a conversation without an assistant turn is fine (a prompt
    to generate from; training needs one)."""
    if raw is None:
        raise SampleError("bad_json", "the sample has no 'json' member")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SampleError("bad_json", f"conversation is not valid JSON ({e})") from None
    turns_raw = doc.get("conversation") if isinstance(doc, dict) else None
    if not isinstance(turns_raw, list) or not turns_raw:
        raise SampleError("bad_json", "expected an object with a non-empty 'conversation' list")
    turns = [_turn(i, t, members) for i, t in enumerate(turns_raw)]
    if require_assistant and not any(t.role == "assistant" for t in turns):
        raise SampleError("no_assistant_turn", "no assistant turn carries loss")
    # a video's own audio track (audio_member == member) names its member once
    named = [m for t in turns for p in t.parts for m in {p.member, p.audio_member} - {""}]
    twice = sorted({m for m in named if named.count(m) > 1})
    unused = sorted(members - set(named))
    if twice or unused:
        raise SampleError(
            "placeholder_mismatch",
            f"members named by several parts {twice}, members no part names {unused}",
        )
    return turns


def _turn(index: int, turn, members: set[str]) -> Turn:
    if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
        raise SampleError("bad_json", f"turn {index} needs 'role' and 'content'")
    role = turn["role"]
    if role not in ROLES:
        raise SampleError("unknown_role", f"turn {index} has role {role!r}; valid: {ROLES}")
    content = turn["content"]
    if isinstance(content, str):
        return Turn(role, (Part("text", text=content),))
    if not isinstance(content, list) or not content:
        raise SampleError("bad_content", f"turn {index}: content must be a string or parts")
    parts = tuple(_part(index, p, members) for p in content)
    if role != "user" and any(p.kind != "text" for p in parts):
        raise SampleError("bad_content", f"turn {index}: only user turns may hold media")
    return Turn(role, parts)


def _part(index: int, part, members: set[str]) -> Part:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise SampleError("bad_content", f"turn {index}: a text part needs 'text'")
        return Part("text", text=part["text"])
    if kind not in MEDIA_KINDS:
        raise SampleError("bad_content", f"turn {index}: unknown part type {kind!r}")
    member = part.get("member")
    if not isinstance(member, str) or member not in members:
        raise SampleError(
            "missing_member", f"turn {index}: {kind} part names {member!r}, not a member"
        )
    audio = part.get("audio", False) if kind == "video" else False
    if audio is True:
        audio_member = member  # the video container's own audio track
    elif isinstance(audio, str):
        if audio not in members:
            raise SampleError("missing_member", f"turn {index}: video audio {audio!r} missing")
        audio_member = audio
    elif audio is False or audio is None:
        audio_member = ""
    else:
        raise SampleError("bad_content", f"turn {index}: video 'audio' must be bool or member")
    return Part(kind, member=member, audio_member=audio_member)
