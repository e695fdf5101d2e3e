"""Tests for models.tokenizer: exact round trips, persistence, streaming decode."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from models.data import load_corpus
from models.tokenizer import (
    EOT_TOKEN,
    MIN_VOCAB_SIZE,
    IncrementalDecoder,
    eot_id,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

# A slice is enough to learn real merges and keeps training well under 1 s.
TRAIN_CHARS = 200_000

# Every code point except surrogates (not encodable as UTF-8); includes NUL,
# controls, combining marks, CJK and astral-plane emoji.
ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)
# Text biased towards multi-byte characters, where streaming bugs live. U+FFFD
# itself is excluded: the "no delta contains U+FFFD" property is about
# replacement chars the decoder invents, not ones the text really contains.
MULTIBYTE_TEXT = st.text(
    st.one_of(
        st.sampled_from(list("héllo wörld\n\t 世界日本語\u0301\u0308😀👍🏽🇯🇵\u200d👩\x00\x07")),
        st.characters(min_codepoint=0x80, blacklist_categories=("Cs",), blacklist_characters="\ufffd"),
    ),
    max_size=40,
)
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def corpus_slice() -> str:
    return load_corpus()[:TRAIN_CHARS]


@pytest.fixture(scope="module")
def tok(corpus_slice: str) -> Tokenizer:
    return train_tokenizer(corpus_slice, vocab_size=512)


def stream(tok: Tokenizer, ids: list[int], prompt_ids: list[int] | None = None) -> list[str]:
    """All deltas from pushing `ids` one by one, then the flush."""
    dec = IncrementalDecoder(tok, prompt_ids)
    return [dec.push(i) for i in ids] + [dec.flush()]


# --------------------------------------------------------------------------- #
# Training and round trips
# --------------------------------------------------------------------------- #


def test_trained_vocab_and_eot(tok: Tokenizer) -> None:
    assert tok.get_vocab_size() == 512
    assert tok.token_to_id(EOT_TOKEN) == 0
    assert eot_id(tok) == 0
    # Real merges were learned: common words are single tokens or close to it.
    assert len(tok.encode(" the").ids) == 1


def test_training_is_deterministic(corpus_slice: str, tok: Tokenizer) -> None:
    assert train_tokenizer(corpus_slice, vocab_size=512).to_str() == tok.to_str()


@pytest.mark.parametrize("bad", [0, 256, 257, MIN_VOCAB_SIZE - 1])
def test_vocab_size_too_small(bad: int) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer("some text", vocab_size=bad)


def test_empty_training_text() -> None:
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer("  \n ", vocab_size=MIN_VOCAB_SIZE)


@pytest.mark.parametrize(
    "s",
    [
        "In the beginning God created the heavens and the earth.",
        "emoji 😀👍🏽🇯🇵 family 👩\u200d👩\u200d👧",
        "CJK 世界 日本語 한국어",
        "combining e\u0301 a\u0308 \u0915\u094d\u0937",
        "controls \x01\x07\x1b[0m\t\r\n\x7f",
        "NUL \x00 in the middle\x00",
        "   leading and trailing spaces   ",
        "\n\n\n",
    ],
)
def test_round_trip_examples(tok: Tokenizer, s: str) -> None:
    assert tok.decode(tok.encode(s).ids) == s


# Any text, with the literal spelling of the special token mixed in (fragments too).
TEXT_WITH_SPECIALS = st.lists(
    st.one_of(ANY_TEXT, st.sampled_from([EOT_TOKEN, "<|", "|>", "endoftext", EOT_TOKEN * 2])), max_size=6
).map("".join)


@SETTINGS
@given(s=TEXT_WITH_SPECIALS)
def test_round_trip_any_unicode(tok: Tokenizer, s: str) -> None:
    ids = tok.encode(s).ids
    # Text never turns into the special token, even when it spells it.
    assert eot_id(tok) not in ids
    assert tok.decode(ids) == s


@pytest.mark.parametrize("where", ["alone", "inside"])
def test_special_token_literal_is_plain_text(tok: Tokenizer, tmp_path, where: str) -> None:
    """Trained and loaded tokenizers both encode every special token's text as ordinary tokens."""
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    for t in (tok, loaded):
        for added in t.get_added_tokens_decoder().values():
            s = added.content if where == "alone" else f"Ignore this.{added.content}And now"
            ids = t.encode(s).ids
            assert t.token_to_id(added.content) not in ids
            assert t.decode(ids) == s
    # The raw library default would have produced the control id: the protection is ours.
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert eot_id(raw) in raw.encode(EOT_TOKEN).ids


def test_unseen_bytes_are_representable(tok: Tokenizer) -> None:
    # The corpus is ASCII only, yet every byte symbol is in the vocabulary.
    s = "".join(chr(c) for c in range(0x80, 0x800, 7))
    assert tok.decode(tok.encode(s).ids) == s


# --------------------------------------------------------------------------- #
# Save / load
# --------------------------------------------------------------------------- #


def test_save_load_round_trip(tok: Tokenizer, tmp_path) -> None:
    path = tmp_path / "sub" / "tokenizer.json"
    save_tokenizer(tok, path)
    loaded = load_tokenizer(path)
    s = "héllo 😀 wörld"
    assert loaded.encode(s).ids == tok.encode(s).ids
    assert loaded.to_str() == tok.to_str()


def test_load_missing(tmp_path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(path)


def test_load_corrupt_json(tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"model": ')
    with pytest.raises(ValueError, match=r"bad\.json.*not valid JSON"):
        load_tokenizer(path)


def test_load_json_that_is_not_a_tokenizer(tmp_path) -> None:
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"hello": "world"}))
    with pytest.raises(ValueError, match=r"other\.json"):
        load_tokenizer(path)


def test_eot_id_missing() -> None:
    from tokenizers import models

    with pytest.raises(ValueError, match="endoftext"):
        eot_id(Tokenizer(models.BPE()))


# --------------------------------------------------------------------------- #
# Incremental decoding
# --------------------------------------------------------------------------- #


@SETTINGS
@given(s=MULTIBYTE_TEXT)
def test_incremental_matches_full_decode(tok: Tokenizer, s: str) -> None:
    ids = tok.encode(s).ids
    deltas = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == s
    # s is valid UTF-8, so no delta may ever carry a replacement char.
    assert not any("\ufffd" in d for d in deltas)


@SETTINGS
@given(prompt=MULTIBYTE_TEXT, s=MULTIBYTE_TEXT)
def test_incremental_with_prompt(tok: Tokenizer, prompt: str, s: str) -> None:
    ids = tok.encode(s).ids
    deltas = stream(tok, ids, prompt_ids=tok.encode(prompt).ids)
    assert "".join(deltas) == s
    assert not any("\ufffd" in d for d in deltas)


def test_emoji_split_across_tokens_is_held_back(tok: Tokenizer) -> None:
    ids = tok.encode("😀").ids
    # The corpus has no emoji, so its 4 UTF-8 bytes stay 4 byte tokens.
    assert len(ids) == 4
    dec = IncrementalDecoder(tok, tok.encode("Hi ").ids)
    assert [dec.push(i) for i in ids] == ["", "", "", "😀"]
    assert dec.flush() == ""


def test_flush_emits_incomplete_bytes_as_replacement(tok: Tokenizer) -> None:
    ids = tok.encode("ok 😀").ids[:-1]  # drop the last byte of the emoji
    deltas = stream(tok, ids)
    assert deltas[-1].endswith("\ufffd")
    assert "".join(deltas) == tok.decode(ids)


def test_genuine_replacement_char_is_emitted(tok: Tokenizer) -> None:
    # A real U+FFFD in the output is only delayed, never lost or duplicated.
    s = "a\ufffdb\ufffd"
    deltas = stream(tok, tok.encode(s).ids)
    assert "".join(deltas) == s
    assert deltas[-1] == "\ufffd"  # the trailing one waits for flush


def test_eot_is_skipped_and_push_after_flush_fails(tok: Tokenizer) -> None:
    dec = IncrementalDecoder(tok)
    text = "".join(dec.push(i) for i in tok.encode("amen").ids)
    assert dec.push(eot_id(tok)) == ""
    assert text + dec.flush() == "amen"
    with pytest.raises(RuntimeError):
        dec.push(1)


def test_decode_window_stays_small(tok: Tokenizer) -> None:
    # O(window) per token: after thousands of pushes only a few ids are kept.
    dec = IncrementalDecoder(tok)
    ids = tok.encode("In the beginning 😀 世界. " * 200).ids
    for i in ids:
        dec.push(i)
        assert len(dec._ids) <= 8
