"""Conversation format, tokenizer and chat template: exact tokens, loss masks, media runs."""

from __future__ import annotations

import filecmp
import json

import pytest

from omni_train.config.data import LAYOUTS, TokenizerConfig
from omni_train.config.model import MediaTokenConfig
from omni_train.data.chat import (
    AudioPlan,
    ImagePlan,
    VideoPlan,
    check_template,
    frame_label,
    layout,
    prompt,
)
from omni_train.data.conversation import SampleError, parse_conversation
from omni_train.data.layouts import layout_for
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


def test_release_vocabulary_by_name_and_model_ids(tok):
    s = tok.specials
    names = {
        "<img>": s.image_start,
        "</img>": s.image_end,
        "<image>": s.image,
        "<so_start>": s.audio_start,
        "<so_embedding>": s.audio,
        "<so_end>": s.audio_end,
    }
    for name, tid in names.items():
        assert tok.hf.convert_tokens_to_ids(name) == tid, name
    assert (s.image, s.audio) == (10, 12)  # model=tiny's media_tokens
    assert tok.vocab_size <= 512
    check_media_ids(tok, MediaTokenConfig(), 512)
    with pytest.raises(ValueError, match=r"model.media_tokens.audio=99 .* set model.media_tokens"):
        check_media_ids(tok, MediaTokenConfig(audio=99), 512)
    with pytest.raises(ValueError, match="model.vocab_size=256"):
        check_media_ids(tok, MediaTokenConfig(), 256)
    with pytest.raises(ValueError, match=r"data.tokenizer.image='<picture>' is not a single"):
        Tokenizer(TokenizerConfig(image="<picture>"))
    with pytest.raises(ValueError, match=r"data.tokenizer.audio_start='<sound>' is not a single"):
        Tokenizer(TokenizerConfig(audio_start="<sound>"))  # the pre-release spelling
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer(TokenizerConfig(path="/nonexistent"))


def _turns(*turns, members=()):
    return parse_conversation(conv(*turns), set(members))


IMAGE_TURNS = (
    {"role": "system", "content": "Be brief."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "What is it?"}, {"type": "image", "member": "a.png"}],
    },
    {"role": "assistant", "content": "<think>red</think>A red square."},
)


def test_template_tokens_and_loss_mask(tok):
    """The prompt is the chat template's output; the ids are that text tokenized in one go
    with each placeholder widened to its run; loss exactly on the assistant content and the
    end-of-turn token that closes it."""
    s = tok.specials
    turns = _turns(*IMAGE_TURNS, members={"a.png"})
    text = prompt(turns, [ImagePlan(4, 6)], tok)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is it?\n<image>"},
        {"role": "assistant", "content": "<think>red</think>A red square."},
    ]
    assert text == tok.hf.apply_chat_template(messages, tokenize=False)  # the folder's template
    lay = layout(turns, [ImagePlan(4, 6)], tok)
    ids, loss = lay.materialize()
    expanded = text.replace("<image>", "<img>" + "<image>" * 6 + "</img>")
    assert ids == tok.encode(expanded)
    answer = tok.encode("<think>red</think>A red square.") + [s.im_end]
    start = len(tok.encode(expanded.split("<think>")[0]))
    assert ids[start : start + len(answer)] == answer
    assert loss == [False] * start + [True] * len(answer) + [False] * (
        len(ids) - start - len(answer)
    )
    assert answer[0] == s.think_start and s.think_end in answer  # reasoning is plain text
    assert lay.num_tokens == len(ids)


def test_a_folder_template_renders_the_conversation(tmp_path, tok):
    """A tokenizer folder's own chat template decides the text around the turns; the loss
    still falls on the assistant content (found by sentinels, whatever the template adds)."""
    import shutil

    shutil.copy(TINY_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m.role | upper }}: {{ m.content }}<|im_end|>"
        "{% endfor %}"
    )
    other = Tokenizer(TokenizerConfig(path=str(tmp_path)))
    turns = _turns(*IMAGE_TURNS, members={"a.png"})
    text = prompt(turns, [ImagePlan(2, 2)], other)
    assert text.startswith("<|im_start|>SYSTEM: Be brief.<|im_end|><|im_start|>USER: What is it?")
    ids, loss = layout(turns, [ImagePlan(2, 2)], other).materialize()
    learned = [i for i, flag in zip(ids, loss, strict=True) if flag]
    assert learned == other.encode("<think>red</think>A red square.") + [other.specials.im_end]
    # a template that drops media placeholders cannot be laid out: the sample is refused
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m.content | replace('<image>', '') }}{% endfor %}"
    )
    dropping = Tokenizer(TokenizerConfig(path=str(tmp_path)))
    with pytest.raises(SampleError, match="placeholder_mismatch"):
        layout(turns, [ImagePlan(2, 2)], dropping)
    # ... and the start-up check stops the job before any data is read, with the fix
    check_template(other)
    with pytest.raises(
        ValueError, match=r"its chat template cannot lay out .* chat_template.jinja"
    ):
        check_template(dropping)


def test_media_strings_in_text_are_refused(tok):
    for text in ("see <image>", "<so_start>", "a \ue000 b"):
        turns = _turns({"role": "user", "content": text}, {"role": "assistant", "content": "x"})
        with pytest.raises(SampleError, match="placeholder_mismatch"):
            layout(turns, [], tok)


VIDEO = VideoPlan((0.0, 0.5, 1.0, 1.5, 2.0), (0.0, 0.5, 1.0, 1.5, 2.0), 4, 4, 2, audio_clips=(40,))


def test_video_frame_labels_and_audio_in_both_layouts(tok):
    s = tok.specials
    turns = _turns(
        {"role": "user", "content": [{"type": "video", "member": "v.mp4", "audio": True}]},
        {"role": "assistant", "content": "ok"},
        members={"v.mp4"},
    )
    # 5 frames at 0.5 s steps, tubelets of 2 -> groups start at 0.0, 1.0, 2.0 s
    assert VIDEO.num_groups == 3 and VIDEO.tokens_per_group == 4
    assert VIDEO.audio_chunks() == [13, 12, 15]  # 80 ms per token: [0,1), [1,2), [2,...)
    groups = (
        "Frame 1 sampled at 0.00 seconds and frame 2 sampled at 0.50 seconds: <img>{v}</img>{a0}\n"
        "Frame 3 sampled at 1.00 seconds and frame 4 sampled at 1.50 seconds: <img>{v}</img>{a1}\n"
        "Frame 5 sampled at 2.00 seconds: <img>{v}</img>{a2}"
    )
    run = lambda n: "<so_start>" + "<so_embedding>" * n + "<so_end>"  # noqa: E731
    for mode, video_text in (
        ("processor", groups.format(v="<image>" * 4, a0="", a1="", a2="") + "\n" + run(40)),
        ("report", groups.format(v="<image>" * 4, a0=run(13), a1=run(12), a2=run(15))),
    ):
        ids, _ = layout(turns, [VIDEO], tok, layout_for(mode)).materialize()
        head = prompt(turns, [VIDEO], tok, layout_for(mode)).split("<video>")[0]
        assert ids == tok.encode(
            head + video_text + "<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
        )
        assert ids.count(s.image) == 12 and ids.count(s.audio) == 40
    no_tube = VideoPlan((0.0, 0.5, 1.0), (0.0, 0.5, 1.0), 2, 2, 1)
    assert no_tube.num_groups == 3 and no_tube.audio_chunks() == [0, 0, 0]
    assert frame_label(no_tube, 1) == "Frame 2 sampled at 0.50 seconds: "


def test_every_config_layout_has_its_layout_object():
    assert [layout_for(name).name for name in LAYOUTS] == list(LAYOUTS)
    with pytest.raises(ValueError, match="layout 'hf'; valid"):
        layout_for("hf")


def test_audio_runs_per_layout(tok):
    turns = _turns(
        {"role": "user", "content": [{"type": "audio", "member": "a.wav"}]},
        {"role": "assistant", "content": "hi"},
        members={"a.wav"},
    )
    for clips in ((938,), (376, 376, 188)):  # 75 s: one encoder input, or 30 s clips
        ids, loss = layout(turns, [AudioPlan(75 * 16000, clips)], tok).materialize()
        assert ids.count(tok.specials.audio) == sum(clips)
        assert ids.count(tok.specials.audio_start) == 1  # one run per stream
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
    full = layout(turns, [ImagePlan(4, 4), AudioPlan(16000, (12,))], tok)
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


def test_data_show_prints_what_the_model_sees(tmp_path):
    """``omni-train data show``: collapsed text, ids, loss mask and media per line, the
    training code path; a bad line is reported with its number and reason."""
    import numpy as np

    from omni_train.cli import main
    from omni_train.datatools.encode import encode_png

    (tmp_path / "a.png").write_bytes(encode_png(np.zeros((40, 60, 3), dtype=np.uint8)))
    lines = [
        {"key": "img", "conversation": [
            {"role": "user", "content": [{"type": "text", "text": "What?"},
                                         {"type": "image", "member": "a.png"}]},
            {"role": "assistant", "content": "Black."}]},
        {"key": "bad", "conversation": [{"role": "user", "content": "x"}]},
    ]  # fmt: skip
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    from omni_train.config import compose_job
    from omni_train.datatools.show import show

    records, skipped = show(jsonl, tmp_path, compose_job(["model=tiny"]))
    first, second = records
    from omni_train.data import tokens

    rows, cols = tokens.image_grid(60, 40, min_patches=4, max_patches=64)  # model=tiny's budget
    n = tokens.grid_tokens(rows, cols)
    assert first["media"] == [{"kind": "image", "grid": [rows, cols], "tokens": n}]
    assert f"What?\n<img><image>x{n}</img><|im_end|>" in first["text"]
    tok = load_tokenizer(TokenizerConfig())
    learned = [i for i, m in zip(first["ids"], first["loss_mask"], strict=True) if m]
    assert learned == tok.encode("Black.") + [tok.specials.im_end]
    assert first["num_tokens"] == len(first["ids"])
    assert second == {"line": 2, "skipped": "no_assistant_turn", "error": second["error"]}
    assert skipped == {"no_assistant_turn": 1}
    assert main(["data", "show", str(jsonl), "--media", str(tmp_path), "model=tiny"]) == 0
