"""The text tokenizer: a Hugging Face tokenizer from a local folder, its special tokens and its
chat template.

Production points ``data.tokenizer.path`` at the real model's tokenizer folder. Tests and the
smoke run use ``path: tiny``, a 512-token byte-level BPE that ships with omni-train
(``omni_train/data/assets/tiny_tokenizer``, rebuilt bit-identically by
:func:`build_tiny_tokenizer`) and has the release's media tokens by name (``<img>``,
``</img>``, ``<image>``, ``<so_start>``, ``<so_embedding>``, ``<so_end>``), at the ids the tiny
model's config expects, and a ChatML chat template.

Conversations are rendered by the folder's chat template (``chat_template`` in
``tokenizer_config.json``, or ``chat_template.jinja``); a folder without one renders with
:data:`CHATML_TEMPLATE`.

Special tokens are looked up by *name* (``TokenizerConfig``); each must be one token of the
tokenizer. The media placeholder ids must equal ``model.media_tokens``: that is checked once at
start-up (:func:`check_media_ids`), before any data is read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

from omni_train.config.data import TokenizerConfig
from omni_train.config.model import MediaTokenConfig

TINY = "tiny"
TINY_DIR = Path(__file__).parent / "assets" / "tiny_tokenizer"
TINY_VOCAB_SIZE = 512

# The shipped tokenizer's special tokens, in id order (ids 0..14). Placeholders sit at 10/11/12,
# the ids model=tiny declares (MediaTokenConfig's defaults); the names are the release's.
TINY_SPECIALS = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<img>",
    "</img>",
    "<image>",
    "<video>",
    "<so_embedding>",
    "<so_start>",
    "<so_end>",
)

# ChatML, rendered by Hugging Face's ``apply_chat_template`` (content is a string: media parts
# arrive as their placeholder strings). The tiny tokenizer ships it; a tokenizer folder without a
# template uses it too.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Text the tiny BPE merges are learned from: chat scaffolding, numbers and the words of the
# synthetic conversations, so that common words become single tokens.
_TINY_CORPUS = """system user assistant You are a helpful assistant.
What is in the picture? What colour is the shape? How many pages does the document have?
Describe the image. Describe the video. Transcribe the audio. What do you hear?
Compare the two images. Which image is brighter? The first one. The second one.
A red square. A green circle. A blue triangle. A yellow square on a white background.
The square moves from left to right. The tone is high. The tone is low. A short beep.
Frame 1 sampled at 0.00 seconds and frame 2 sampled at 0.50 seconds:
Frame Frames at seconds page pages the a an is are of on in and to from with
0 1 2 3 4 5 6 7 8 9 0.0 0.5 1.0 1.5 2.0 2.5 3.0 10 20 30
Let me think. I think the answer is yes. no. The answer is
"""


@dataclass(frozen=True)
class Specials:
    """Ids of the tokens the chat template and the model use."""

    im_start: int
    im_end: int
    pad: int
    image: int
    audio: int
    image_start: int
    image_end: int
    audio_start: int
    audio_end: int
    think_start: int
    think_end: int

    @property
    def media(self) -> tuple[int, ...]:
        """Ids that must never come from text: placeholders and media markers."""
        return (
            self.image,
            self.audio,
            self.image_start,
            self.image_end,
            self.audio_start,
            self.audio_end,
        )


MEDIA_NAMES = ("image", "video", "audio", "image_start", "image_end", "audio_start", "audio_end")


class Tokenizer:
    """A thin wrapper: text -> ids without adding BOS/EOS, plus the special-token ids."""

    def __init__(self, cfg: TokenizerConfig):
        from transformers import PreTrainedTokenizerFast

        path = TINY_DIR if cfg.path == TINY else Path(cfg.path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"data.tokenizer.path={cfg.path!r}: no tokenizer.json in {path}; give a local "
                "Hugging Face tokenizer folder, or 'tiny' for the shipped test tokenizer"
            )
        self.path = path
        self.hf = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
        self.vocab_size = len(self.hf)
        ids = {}
        for name in Specials.__dataclass_fields__:
            token = getattr(cfg, name)
            if not token:
                raise ValueError(f"data.tokenizer.{name} is empty; give that token's spelling")
            tid = self.hf.convert_tokens_to_ids(token)
            if tid is None or tid == self.hf.unk_token_id or self.hf.decode([tid]) != token:
                raise ValueError(
                    f"data.tokenizer.{name}={token!r} is not a single token of the tokenizer in "
                    f"{path}; set data.tokenizer.{name} to that tokenizer's spelling"
                )
            ids[name] = tid
        self.specials = Specials(**ids)
        self.cfg = cfg
        # text that must never come from a sample: it would forge media or its markers
        self._media_strings = tuple(getattr(cfg, n) for n in MEDIA_NAMES)
        self.chat_template = _folder_template(path) or CHATML_TEMPLATE
        self.hf.chat_template = self.chat_template

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special-token strings in it become their ids)."""
        return self.hf.encode(text, add_special_tokens=False)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` and each token's ``(start, end)`` character span."""
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        """A conversation (``role`` and string ``content`` per message) through the chat
        template, as text; with ``generation_prompt`` followed by what opens the assistant's
        reply (the template's ``add_generation_prompt``), for generation."""
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def media_strings_in(self, text: str) -> list[str]:
        """Media placeholder/marker strings that occur in ``text`` (they would forge media)."""
        return [s for s in self._media_strings if s in text]


def _folder_template(path: Path) -> str | None:
    """The folder's chat template, where Hugging Face keeps one: ``chat_template.jinja``, or
    ``chat_template`` in ``tokenizer_config.json`` (a string, or named templates of which
    "default" is used)."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = path / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def load_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """One Tokenizer per distinct config per process (loading parses a JSON file)."""
    return _load(tuple(sorted(asdict(cfg).items())))


@cache
def _load(items: tuple) -> Tokenizer:
    return Tokenizer(TokenizerConfig(**dict(items)))


def check_media_ids(tok: Tokenizer, media: MediaTokenConfig, vocab_size: int) -> None:
    """The model's placeholder ids and vocabulary must fit the tokenizer (start-up check)."""
    s = tok.specials
    # video frames fill image placeholders (the release has no video token), so
    # model.media_tokens.video is not checked: it only travels to the HF config
    for name, want in (("image", s.image), ("audio", s.audio)):
        have = getattr(media, name)
        if have != want:
            raise ValueError(
                f"model.media_tokens.{name}={have} but the tokenizer in {tok.path} gives its "
                f"placeholder id {want}; set model.media_tokens.{name}={want}"
            )
    if tok.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer in {tok.path} has {tok.vocab_size} tokens but model.vocab_size="
            f"{vocab_size}; use a model whose vocabulary covers the tokenizer"
        )


def build_tiny_tokenizer(out_dir: str | Path) -> Path:
    """(Re)build the shipped tiny tokenizer: byte-level BPE, 512 tokens (deterministic)."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(TINY_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(_TINY_CORPUS.splitlines(), trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw.save(str(out / "tokenizer.json"), pretty=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHATML_TEMPLATE,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "model_max_length": 1 << 20,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
