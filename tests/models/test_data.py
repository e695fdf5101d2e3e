"""Tests for models.data: corpus loading errors, splits, encoding and batching."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tokenizers import Tokenizer

from models.data import (
    DOC_SEPARATOR,
    DataError,
    TokenBatcher,
    encode_corpus,
    load_corpus,
    split_train_val,
)
from models.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def corpus() -> str:
    return load_corpus()


@pytest.fixture(scope="module")
def tok(corpus: str) -> Tokenizer:
    return train_tokenizer(corpus[:200_000], vocab_size=512)


# --------------------------------------------------------------------------- #
# Default corpus
# --------------------------------------------------------------------------- #


def test_default_corpus(corpus: str) -> None:
    assert len(corpus) > 3_000_000
    assert corpus.startswith("Genesis\n\nChapter 1\nIn the beginning God created the heavens and the earth.")
    assert "\nRevelation\n" in corpus
    assert "{" not in corpus and "}" not in corpus
    # Deterministic: a second load is identical.
    assert load_corpus() == corpus


# --------------------------------------------------------------------------- #
# Files and folders
# --------------------------------------------------------------------------- #


def test_load_file_str_and_path(tmp_path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("héllo 😀\nworld\n", encoding="utf-8")
    assert load_corpus(f) == load_corpus(str(f)) == "héllo 😀\nworld\n"


def test_bom_is_stripped(tmp_path) -> None:
    f = tmp_path / "bom.txt"
    f.write_bytes(b"\xef\xbb\xbfhi")
    assert load_corpus(f) == "hi"


def test_folder_sorted_recursive_hidden_skipped(tmp_path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "2.txt").write_text("B2")
    (tmp_path / "b" / "1.txt").write_text("B1")
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "c.txt").write_text("C")
    (tmp_path / ".hidden.txt").write_text("HIDDEN")
    (tmp_path / ".git" / "HEAD").write_bytes(b"\x00binary")
    (tmp_path / "empty.txt").write_text("")
    assert load_corpus(tmp_path) == DOC_SEPARATOR.join(["A", "B1", "B2", "C"])


def test_missing_path(tmp_path) -> None:
    with pytest.raises(DataError, match=r"does not exist.*nope"):
        load_corpus(tmp_path / "nope")


def test_empty_file(tmp_path) -> None:
    f = tmp_path / "empty.txt"
    f.write_text("")
    with pytest.raises(DataError, match=r"empty\.txt is empty"):
        load_corpus(f)


def test_whitespace_file(tmp_path) -> None:
    f = tmp_path / "ws.txt"
    f.write_text(" \n\t\n ")
    with pytest.raises(DataError, match=r"ws\.txt is whitespace only"):
        load_corpus(f)


def test_binary_file_with_nul(tmp_path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"abc\x00\x01\x02")
    with pytest.raises(DataError, match=r"model\.bin looks binary: NUL byte at offset 3"):
        load_corpus(f)


def test_invalid_utf8_file(tmp_path) -> None:
    f = tmp_path / "latin1.txt"
    f.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not valid UTF-8: byte 0xe9 at offset 3"):
        load_corpus(f)


def test_bad_file_inside_folder_is_named(tmp_path) -> None:
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bad.dat").write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match=r"sub/bad\.dat is not valid UTF-8.*offset 0"):
        load_corpus(tmp_path)


def test_empty_folder(tmp_path) -> None:
    with pytest.raises(DataError, match="no .*files"):
        load_corpus(tmp_path)


def test_folder_of_blank_files(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("  \n")
    with pytest.raises(DataError, match="only empty or whitespace"):
        load_corpus(tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions")
def test_unreadable_file(tmp_path) -> None:
    f = tmp_path / "secret.txt"
    f.write_text("x")
    f.chmod(0)
    try:
        with pytest.raises(DataError, match=r"secret\.txt: permission denied"):
            load_corpus(f)
    finally:
        f.chmod(0o600)


def test_permission_error_is_data_error(tmp_path, monkeypatch) -> None:
    # Runs even as root (where chmod 0 does not block reads): simulate the OS error.
    f = tmp_path / "locked.txt"
    f.write_text("x")

    def deny(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(f), "read_bytes", deny)
    with pytest.raises(DataError, match=r"locked\.txt: permission denied"):
        load_corpus(f)


# --------------------------------------------------------------------------- #
# Splitting
# --------------------------------------------------------------------------- #


def _chunks(text: str, n: int) -> list[str]:
    return [text[i : i + n] for i in range(0, len(text), n)]


def test_split_partitions_chunks(corpus: str) -> None:
    text = corpus[:500_000]
    train, val = split_train_val(text, val_fraction=0.1, seed=3, chunk_chars=1000)
    assert train and val
    chunks = _chunks(text, 1000)
    train_chunks, val_chunks = _chunks(train, 1000), _chunks(val, 1000)
    # Every chunk went wholly to one side, in order, and nothing was lost.
    assert len(train_chunks) + len(val_chunks) == len(chunks)
    assert len(val_chunks) == 50
    merged = sorted(train_chunks + val_chunks, key=chunks.index)
    assert merged == chunks
    assert len(train) + len(val) == len(text)


def test_split_deterministic_and_seed_dependent(corpus: str) -> None:
    text = corpus[:200_000]
    a = split_train_val(text, seed=0, chunk_chars=512)
    assert split_train_val(text, seed=0, chunk_chars=512) == a
    assert split_train_val(text, seed=1, chunk_chars=512) != a


def test_split_two_chunks_both_non_empty() -> None:
    train, val = split_train_val("ab" * 5, val_fraction=0.05, chunk_chars=6)
    assert train and val
    assert sorted([train, val]) == sorted(["ababab", "abab"])


@pytest.mark.parametrize("frac", [0.0, -0.1, 0.51, 1.0])
def test_split_bad_fraction(frac: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val("x" * 100, val_fraction=frac, chunk_chars=10)


def test_split_too_short() -> None:
    with pytest.raises(DataError, match="chunk_chars"):
        split_train_val("short", chunk_chars=2048)


# --------------------------------------------------------------------------- #
# Encoding
# --------------------------------------------------------------------------- #


def test_encode_corpus_round_trip(tok: Tokenizer, corpus: str) -> None:
    text = corpus[:50_000] + "\n\nünïcode 😀 tail without newline"
    ids = encode_corpus(tok, text)
    assert ids.dtype == torch.int64 and ids.dim() == 1
    assert tok.decode(ids.tolist()) == text
    # Grouped encoding matches encoding the whole text in one go on this
    # corpus (no whitespace run straddles a group border).
    assert ids.tolist() == tok.encode(text).ids


# --------------------------------------------------------------------------- #
# Batching
# --------------------------------------------------------------------------- #


TOKENS = torch.arange(1000, dtype=torch.int64) * 7 % 513  # distinct-ish, non-trivial ids


def test_batch_shapes_and_shift() -> None:
    b = TokenBatcher(TOKENS, seq_len=16, batch_size=4, seed=0)
    x, y = b.next_batch()
    assert x.shape == y.shape == (4, 16)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # Each row is a contiguous window of the stream.
    for row_x, row_y in zip(x, y, strict=True):
        start = int(torch.nonzero(row_x[0] == TOKENS)[0])
        assert torch.equal(row_x, TOKENS[start : start + 16])
        assert torch.equal(row_y, TOKENS[start + 1 : start + 17])


def test_batches_deterministic_per_seed() -> None:
    a = [TokenBatcher(TOKENS, 8, 4, seed=5).next_batch() for _ in range(2)]
    assert torch.equal(a[0][0], a[1][0])
    c = TokenBatcher(TOKENS, 8, 4, seed=6).next_batch()
    assert not torch.equal(a[0][0], c[0])


def test_exact_resume_through_json() -> None:
    b = TokenBatcher(TOKENS, seq_len=8, batch_size=3, seed=1)
    for _ in range(5):
        b.next_batch()
    state = json.loads(json.dumps(b.state_dict()))
    expected = [b.next_batch() for _ in range(4)]

    resumed = TokenBatcher(TOKENS, seq_len=8, batch_size=3, seed=999)
    resumed.load_state_dict(state)
    assert resumed.step == 5
    for (ex, ey), (rx, ry) in zip(expected, (resumed.next_batch() for _ in range(4)), strict=True):
        assert torch.equal(ex, rx) and torch.equal(ey, ry)


def test_load_state_for_other_stream_fails() -> None:
    state = TokenBatcher(TOKENS, 8, 3).state_dict()
    with pytest.raises(DataError, match="num_tokens"):
        TokenBatcher(TOKENS[:-1], 8, 3).load_state_dict(state)


def test_iter_eval_covers_split_without_overlap() -> None:
    b = TokenBatcher(TOKENS[:101], seq_len=10, batch_size=2)
    batches = list(b.iter_eval(batch_size=3))
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert [x.shape[0] for x, _ in batches] == [3, 3, 3, 1]
    assert torch.equal(xs.flatten(), TOKENS[:100])
    assert torch.equal(ys.flatten(), TOKENS[1:101])
    # Deterministic and independent of the training generator.
    b.next_batch()
    again = list(b.iter_eval(batch_size=3, max_batches=2))
    assert len(again) == 2
    assert all(torch.equal(a[0], c[0]) for a, c in zip(again, batches, strict=False))


def test_too_few_tokens() -> None:
    with pytest.raises(DataError, match="seq_len"):
        TokenBatcher(torch.arange(8), seq_len=8, batch_size=1)
    TokenBatcher(torch.arange(9), seq_len=8, batch_size=1)  # exactly seq_len + 1 is enough
