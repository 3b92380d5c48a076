"""Conversation format, tokenizer and chat template: exact tokens, loss masks, media runs."""

from __future__ import annotations

import filecmp
import json

import pytest

from omni_train.config.schema import MediaTokenConfig, TokenizerConfig
from omni_train.data import tokens
from omni_train.data.chat import AudioPlan, ImagePlan, VideoPlan, layout
from omni_train.data.conversation import SampleError, parse_conversation
from omni_train.data.tokenizer import (
    TINY_DIR,
    Tokenizer,
    build_tiny_tokenizer,
    check_media_ids,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(TokenizerConfig())


def conv(*turns) -> bytes:
    return json.dumps({"conversation": list(turns)}).encode()


def test_shipped_tokenizer_is_reproducible(tmp_path):
    build_tiny_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert filecmp.cmp(tmp_path / name, TINY_DIR / name, shallow=False), name


def test_special_tokens_and_model_ids(tok):
    s = tok.specials
    assert (s.image, s.video, s.audio) == (10, 11, 12)  # model=tiny's media_tokens
    assert tok.vocab_size <= 512
    check_media_ids(tok, MediaTokenConfig(), 512)
    with pytest.raises(ValueError, match=r"model.media_tokens.video=99 .* set model.media_tokens"):
        check_media_ids(tok, MediaTokenConfig(video=99), 512)
    with pytest.raises(ValueError, match="model.vocab_size=256"):
        check_media_ids(tok, MediaTokenConfig(), 256)
    with pytest.raises(ValueError, match=r"data.tokenizer.image='<picture>' is not a single"):
        Tokenizer(TokenizerConfig(image="<picture>"))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer(TokenizerConfig(path="/nonexistent"))


def test_chat_template_tokens_and_loss_mask(tok):
    s = tok.specials
    turns = parse_conversation(
        conv(
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is it?"},
                    {"type": "image", "member": "a.png"},
                ],
            },
            {"role": "assistant", "content": "<think>red</think>A red square."},
        ),
        {"a.png"},
    )
    lay = layout(turns, [ImagePlan(4, 6)], tok)
    ids, loss = lay.materialize()
    enc = tok.encode
    want = (
        [s.im_start] + enc("system\n") + enc("Be brief.") + [s.im_end] + enc("\n")
        + [s.im_start] + enc("user\n") + enc("What is it?") + enc("\n")
        + [s.image_start] + [s.image] * 6 + [s.image_end] + [s.im_end] + enc("\n")
        + [s.im_start] + enc("assistant\n")
    )  # fmt: skip
    answer = enc("<think>red</think>A red square.") + [s.im_end]
    assert ids == want + answer + enc("\n")
    # loss exactly on the assistant's content and its closing <|im_end|>
    assert loss == [False] * len(want) + [True] * len(answer) + [False] * len(enc("\n"))
    assert answer[0] == s.think_start and s.think_end in answer  # reasoning is plain text
    assert lay.num_tokens == len(ids)
    text = len(ids) - 6 - tokens.MARKERS_PER_RUN
    assert tokens.sample_tokens(text, [6]) == len(ids)


def test_video_groups_timestamps_and_audio_interleaving(tok):
    s = tok.specials
    turns = parse_conversation(
        conv(
            {"role": "user", "content": [{"type": "video", "member": "v.mp4", "audio": True}]},
            {"role": "assistant", "content": "ok"},
        ),
        {"v.mp4"},
    )
    # 5 frames at 0.5 s steps, tubelets of 2 -> groups start at 0.0, 1.0, 2.0 s
    plan = VideoPlan((0.0, 0.5, 1.0, 1.5, 2.0), 4, 4, 2, audio_tokens=40)
    assert plan.num_groups == 3 and plan.tokens_per_group == 4
    assert plan.audio_chunks() == [13, 12, 15]  # 80 ms per token: [0,1), [1,2), [2,...)
    ids, _ = layout(turns, [plan], tok).materialize()
    assert ids.count(s.video) == 12 and ids.count(s.audio) == 40
    # in time order: group, its audio, next group ...
    order = [i for i in ids if i in (s.video_start, s.audio_start)]
    assert order == [s.video_start, s.audio_start] * 3
    text = tok.hf.decode(ids)
    assert "Frames 1-2 at 0.00s-0.50s: " in text and "Frame 5 at 2.00s: " in text
    no_tube = VideoPlan((0.0, 0.5, 1.0), 2, 2, 1)
    assert no_tube.num_groups == 3 and no_tube.audio_chunks() == [0, 0, 0]


def test_audio_run(tok):
    turns = parse_conversation(
        conv(
            {"role": "user", "content": [{"type": "audio", "member": "a.wav"}]},
            {"role": "assistant", "content": "hi"},
        ),
        {"a.wav"},
    )
    n = tokens.audio_tokens(75.0)
    ids, loss = layout(turns, [AudioPlan(75 * 16000, n)], tok).materialize()
    assert ids.count(tok.specials.audio) == n == 938
    assert not any(flag for i, flag in zip(ids, loss, strict=True) if i == tok.specials.audio)


@pytest.mark.parametrize(
    ("doc", "members", "reason"),
    [
        (b"{not json", set(), "bad_json"),
        (b'{"turns": []}', set(), "bad_json"),
        (conv({"role": "robot", "content": "x"}), set(), "unknown_role"),
        (conv({"role": "user", "content": [{"type": "smell", "x": 1}]}), set(), "bad_content"),
        (conv({"role": "user", "content": "hi"}), set(), "no_assistant_turn"),
        (
            conv(
                {"role": "user", "content": [{"type": "image", "member": "b.png"}]},
                {"role": "assistant", "content": "x"},
            ),
            {"a.png"},
            "missing_member",
        ),
        (
            conv({"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}),
            {"a.png"},  # a member no part names
            "placeholder_mismatch",
        ),
        (
            conv(
                {"role": "user", "content": [{"type": "image", "member": "a.png"}] * 2},
                {"role": "assistant", "content": "x"},
            ),
            {"a.png"},
            "placeholder_mismatch",
        ),
        (
            conv(
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": [{"type": "image", "member": "a.png"}]},
            ),
            {"a.png"},
            "bad_content",
        ),
    ],
)
def test_bad_conversations_have_reasons(doc, members, reason):
    with pytest.raises(SampleError) as e:
        parse_conversation(doc, members)
    assert e.value.reason == reason


def test_truncate_cuts_text_only_and_keeps_media_whole(tok):
    """data.over_long=truncate: the prefix ends inside text; a media part is kept whole or
    dropped, never cut; materialized tokens are exactly the prefix of the full layout."""
    s = tok.specials
    turns = parse_conversation(
        conv(
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look at these"},
                    {"type": "image", "member": "a.png"},
                    {"type": "text", "text": "and"},
                    {"type": "audio", "member": "b.wav"},
                ],
            },
            {"role": "assistant", "content": "word " * 40},
        ),
        {"a.png", "b.wav"},
    )
    full = layout(turns, [ImagePlan(4, 4), AudioPlan(16000, 12)], tok)
    ids, loss = full.materialize()
    image_end = ids.index(s.image_end) + 1
    audio_start = ids.index(s.audio_start)
    for limit in (full.num_tokens - 7, audio_start + 5, image_end + 1, image_end - 3, 3):
        cut, kept = full.truncate(limit)
        got_ids, got_loss = cut.materialize()
        assert cut.num_tokens == len(got_ids) <= limit
        n = len(got_ids)
        assert (got_ids, got_loss) == (ids[:n], loss[:n])  # a prefix of the sample
        assert got_ids.count(s.image) in (0, 4)  # grid_tokens(4, 4) = 4 tokens, or none
        assert got_ids.count(s.audio) in (0, 12)
        assert kept == (got_ids.count(s.image) > 0) + (got_ids.count(s.audio) > 0)
        if limit == audio_start + 5:  # inside the audio part: cut before its first marker
            assert n == audio_start and kept == 1
        if limit == image_end - 3:  # inside the image part: back to the text before it
            assert kept == 0 and n == ids.index(s.image_start)
    assert full.truncate(full.num_tokens)[0].materialize() == (ids, loss)
