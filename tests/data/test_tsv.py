"""pipelines/tsv.py: the byte-level parser against plain Python, bad rows, chunking, gzip."""
import gzip
import random

import numpy as np
import pytest

from tests.helpers.criteo_rows import REAL_FILES, line, numbered_lines, python_fields
from tfdlrm.errors import UserError
from tfdlrm.pipelines.tsv import ChunkReader, count_lines, explain_line, parse_chunk


def python_parse(raw: str):
    label, dense, cats = python_fields(raw)
    return (float(label), [float(np.float32(int(x))) if x else np.nan for x in dense],
            [int(x, 16) if x else 0 for x in cats], [x == "" for x in cats])


def assert_parsed_like_python(parsed, lines, all_good=True):
    """The good rows of ``parsed`` are ``lines``, read as plain Python reads them."""
    assert len(parsed.good) == len(lines)
    assert len(parsed.bad) == 0 or not all_good
    for r, raw in enumerate(lines):
        label, dense, values, missing = python_parse(raw)
        assert parsed.label[r] == label
        np.testing.assert_array_equal(parsed.dense[r], np.array(dense, np.float32))
        assert parsed.values[r].tolist() == values
        assert parsed.missing[r].tolist() == missing


@pytest.mark.parametrize("name", REAL_FILES)
def test_parser_reads_every_real_row_like_plain_python(criteo_dir, name):
    data = (criteo_dir / name).read_bytes()
    assert_parsed_like_python(parse_chunk(data), data.decode().splitlines())


def test_hand_made_values_negative_long_uppercase_missing():
    lines = [line(1, [-3, 0, 123456789, -123456789012345678, None] + [7] * 8,
                  ["ABCDEF01", "", "00000000", "ffffffff"] + ["0a0b0c0d"] * 22)]
    assert_parsed_like_python(parse_chunk(("\n".join(lines) + "\n").encode()), lines)


BAD = [
    ("", "blank_line", "blank line"),
    ("   ", "blank_line", "blank line"),
    (line()[:-9], "field_count", "39 tab-separated fields"),
    (line() + "\textra", "field_count", "41 tab-separated fields"),
    ("2" + line()[1:], "label", "label is '2'"),
    ("\t".join([""] + line().split("\t")[1:]), "label", "label is ''"),
    (line(dense=[1, "1.5"] + [1] * 11), "dense", "I2 is '1.5', not an integer"),
    (line(dense=[1, 2, "abc"] + [1] * 10), "dense", "I3 is 'abc'"),
    (line(dense=["-"] + [1] * 12), "dense", "I1 is '-'"),
    (line(dense=["+5"] + [1] * 12), "dense", "I1 is '+5'"),
    (line(dense=["1" * 19] + [1] * 12), "dense", "more than 18 digits"),
    (line(dense=["12\r3"] + [1] * 12), "dense", "I1"),
    (line(cats=["xyz12345"] + ["00000001"] * 25), "categorical", "C1 is 'xyz12345', not 8 hex digits"),
    (line(cats=["00000001"] * 25 + ["1234567"]), "categorical", "C26 is '1234567'"),
    (line(cats=["00000001"] * 3 + ["123456789"] + ["00000001"] * 22), "categorical", "C4"),
    (line(cats=["0000\x0001"] + ["00000001"] * 25), "categorical", "C1"),
    (line(cats=["0000\xe901"] + ["00000001"] * 25), "categorical", "C1"),
]


@pytest.mark.parametrize("bad, kind, reason", BAD)
def test_malformed_lines_are_found_and_explained(bad, kind, reason):
    good = numbered_lines(3)
    text = "\n".join([good[0], bad, good[1], good[2]]) + "\n"
    parsed = parse_chunk(text.encode())
    assert parsed.lines == 4
    assert parsed.good.tolist() == [0, 2, 3] and parsed.bad.tolist() == [1]
    got_kind, got_reason = explain_line(parsed.bad_text[0])
    assert got_kind == kind and reason in got_reason


def test_random_corruptions_agree_with_the_plain_python_grammar(criteo_dir):
    """Mutate real rows at random; a row is parsed iff explain_line (regexes) finds nothing wrong."""
    rows = (criteo_dir / "kaggle_split" / "test.txt").read_bytes().split(b"\n")[:500]
    rng = random.Random(7)
    alphabet = b"0123456789abcdefABCDEFgz-+ .\t\r\x00\x0b\xff"
    lines = []
    for _ in range(5000):
        row = bytearray(rng.choice(rows))
        for _ in range(rng.randrange(1, 3)):
            pos = rng.randrange(len(row))
            op = rng.randrange(3)
            if op == 0:
                row[pos] = rng.choice(alphabet)
            elif op == 1:
                del row[pos]
            else:
                row.insert(pos, rng.choice(alphabet))
        lines.append(bytes(row).replace(b"\n", b""))
    parsed = parse_chunk(b"\n".join(lines) + b"\n")
    good = set(parsed.good.tolist())
    verdicts = []
    for i, row in enumerate(lines):
        try:
            explain_line(row)
            verdicts.append(False)
        except ValueError:
            verdicts.append(True)
    assert [i in good for i in range(len(lines))] == verdicts
    assert 200 < len(good) < 4800  # both outcomes are exercised
    # the good ones parse exactly like plain Python
    kept = [lines[i].decode().rstrip("\r") for i in sorted(good)]
    assert_parsed_like_python(parsed, kept, all_good=False)


def test_crlf_line_endings_are_accepted():
    lines = numbered_lines(5)
    lf = parse_chunk(("\n".join(lines) + "\n").encode())
    crlf = parse_chunk(("\r\n".join(lines) + "\r\n").encode())
    assert len(crlf.bad) == 0
    for a, b in ((lf.values, crlf.values), (lf.missing, crlf.missing), (lf.label, crlf.label)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(lf.dense, crlf.dense)


def test_chunks_split_at_line_boundaries_and_count_lines(tmp_path):
    lines = numbered_lines(300)
    path = tmp_path / "x.txt"
    path.write_text("\n".join(lines))  # no final LF
    reader = ChunkReader(str(path), chunk_bytes=1000)
    firsts, rows = [], []
    for first, pieces in reader:
        parsed = parse_chunk(pieces)
        firsts.append(first)
        rows.append(parsed.dense[:, 0])
    assert len(firsts) > 10 and firsts == sorted(firsts)
    np.testing.assert_array_equal(np.concatenate(rows), np.arange(300, dtype=np.float32))
    assert reader.lines == 300 and len(reader.sha256) == 64


def test_gzip_reads_like_plain_and_truncation_is_an_error(tmp_path):
    lines = numbered_lines(2000)
    plain = tmp_path / "x.txt"
    plain.write_text("\n".join(lines) + "\n")
    packed = tmp_path / "x.txt.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    read = lambda p: b"".join(b"".join(pieces) for _, pieces in ChunkReader(str(p), chunk_bytes=4096))
    assert read(packed) == read(plain)
    assert count_lines(str(packed)).lines == 2000
    cut = tmp_path / "cut.gz"
    cut.write_bytes(packed.read_bytes()[: len(packed.read_bytes()) // 2])
    with pytest.raises(UserError, match=r"cut.gz: truncated gzip file"):
        read(cut)


def test_files_that_cannot_be_read(tmp_path):
    with pytest.raises(UserError, match="input file not found"):
        ChunkReader(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(UserError, match="is empty"):
        ChunkReader(str(tmp_path / "empty.txt"))
    with pytest.raises(UserError, match="is a directory"):
        ChunkReader(str(tmp_path))
    (tmp_path / "long.txt").write_bytes(b"1" * (3 << 20))
    with pytest.raises(UserError, match="line 1 is longer than"):
        list(ChunkReader(str(tmp_path / "long.txt"), chunk_bytes=1 << 20))
