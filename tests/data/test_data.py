"""Offline data: the stdlib corpus (deterministic, split by file hash), packing with segment ids,
resumable batches, MQAR, and user files (text, jsonl, npy memmaps), with clear errors: a single
text file split by position, strict UTF-8 (or counted replacements), token ids and eos checked
against the vocab, and an empty split that says why."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from ttt_jax.data import MQAR, Batches, DataConfig, TokenStream, make_dataset
from ttt_jax.data.stdlib_corpus import stdlib_files
from ttt_jax.data.stream import concat_documents, in_validation


def test_stdlib_files_sorted_and_split_by_path_hash():
    root, rel = stdlib_files()
    assert rel == sorted(rel) and len(rel) > 100
    assert not any("site-packages" in r for r in rel)
    val = [r for r in rel if in_validation(r, 2.0)]
    assert 0 < len(val) < 0.1 * len(rel)
    assert [r for r in rel if in_validation(r, 2.0)] == val  # pure function of the path


def test_stdlib_dataset_is_deterministic_bytes():
    a = make_dataset(DataConfig(), seq_len=64)
    b = make_dataset(DataConfig(), seq_len=64)
    assert a.vocab_size == 256 and a.metric == "loss"
    assert a.train.fingerprint == b.train.fingerprint != a.val.fingerprint
    x, y = Batches(a.train, 4, seed=3).batch(7), Batches(b.train, 4, seed=3).batch(7)
    for k in x:
        np.testing.assert_array_equal(x[k], y[k])
    assert x["tokens"].max() < 256 and x["tokens"].dtype == np.int32
    # Without segments the same bytes come as one plain stream: no ids, every target scored.
    plain = make_dataset(DataConfig(segments=False), seq_len=64)
    i = (int(a.train.doc_starts[1]) - 1) // 64  # the example where the second file starts
    x, z = a.train.example(i), plain.train.example(i)
    np.testing.assert_array_equal(z["tokens"], x["tokens"])
    assert x["segment_ids"].max() == 1 and x["loss_mask"].min() == 0.0
    assert z["segment_ids"].max() == 0 and z["loss_mask"].min() == 1.0
    assert plain.train.fingerprint != a.train.fingerprint
    assert not DataConfig(segments=False).uses_segments
    assert not DataConfig(source="mqar").uses_segments and DataConfig().uses_segments


def test_packing_segments_and_boundary_mask():
    tokens, starts = concat_documents([np.arange(1, 6), np.array([], int), np.arange(10, 13)])
    np.testing.assert_array_equal(starts, [0, 5])
    ex = TokenStream(tokens, 7, doc_starts=starts).example(0)
    np.testing.assert_array_equal(ex["tokens"], [1, 2, 3, 4, 5, 10, 11])
    np.testing.assert_array_equal(ex["targets"], [2, 3, 4, 5, 10, 11, 12])
    np.testing.assert_array_equal(ex["segment_ids"], [0, 0, 0, 0, 0, 1, 1])
    # predicting the next document's first token from the previous one is not scored
    np.testing.assert_array_equal(ex["loss_mask"], [1, 1, 1, 1, 0, 1, 1])


def test_eos_segments_keep_eos_in_its_document():
    ex = TokenStream(np.array([5, 6, 0, 7, 8, 0, 9]), 6, eos_id=0).example(0)
    np.testing.assert_array_equal(ex["segment_ids"], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ex["loss_mask"], [1, 1, 0, 1, 1, 0])


def test_batches_rows_match_whole_batch_and_resume():
    stream = TokenStream(np.arange(1000) % 251, 9)
    batches = Batches(stream, 6, seed=1)
    n = stream.num_examples  # 111
    whole = batches.batch(40)  # past one epoch: a new permutation
    part = Batches(stream, 6, seed=1).rows(40, [4, 1])
    for k in whole:
        np.testing.assert_array_equal(part[k], whole[k][[4, 1]])
    epoch = [Batches(stream, 1, seed=1).batch(i)["tokens"][0, 0] for i in range(n)]
    assert sorted(epoch) == sorted(stream.example(i)["tokens"][0] for i in range(n))


def test_mqar_structure_and_determinism():
    src = MQAR(seq_len=24, pairs=4, vocab=32, seed=0)
    ex = src.example(5)
    np.testing.assert_array_equal(ex["tokens"], MQAR(24, 4, 32, 0).example(5)["tokens"])
    keys, values = ex["tokens"][0:8:2], ex["tokens"][1:8:2]
    assert len(set(keys)) == 4 and keys.max() < 16 and values.min() >= 16
    lookup = dict(zip(keys, values, strict=True))
    scored = np.flatnonzero(ex["loss_mask"])
    assert len(scored) > 0 and scored.min() >= 8
    for t in scored:
        assert ex["targets"][t] == lookup[ex["tokens"][t]]
    val = MQAR(24, 4, 32, 0, split="val").example(5)
    assert not np.array_equal(val["tokens"], ex["tokens"])


def test_text_jsonl_and_npy_sources(tmp_path):
    (tmp_path / "txt").mkdir()
    for i in range(30):
        (tmp_path / "txt" / f"d{i:02d}.txt").write_text(f"document {i} " * 20)
    ds = make_dataset(DataConfig(source="text", path=str(tmp_path / "txt"), val_percent=20), 16)
    assert ds.vocab_size == 256 and ds.train.num_examples > 0 and ds.val.num_examples > 0
    lines = [json.dumps({"text": f"line {i} " * 10}) for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    ds = make_dataset(DataConfig(source="jsonl", path=str(tmp_path / "d.jsonl"), val_percent=20), 8)
    assert bytes(ds.train.example(0)["tokens"].astype(np.uint8)).startswith(b"line ")
    np.save(tmp_path / "t.npy", (np.arange(5000) % 100).astype(np.uint16))
    ds = make_dataset(DataConfig(source="npy", path=str(tmp_path / "t.npy"), eos_id=99), 32)
    assert isinstance(ds.train.tokens, np.memmap)
    ex = ds.train.example(3)
    assert ex["segment_ids"].max() == 1  # one eos (99) inside this 33-token window
    assert ds.train.num_examples == (4900 - 1) // 32


def test_bad_data_inputs(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        DataConfig(source="text", path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="needs DataConfig.path"):
        DataConfig(source="npy")
    with pytest.raises(ValueError, match="not one of"):
        DataConfig(source="parquet")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        make_dataset(DataConfig(source="jsonl", path=str(bad)), 4)
    np.save(tmp_path / "f.npy", np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="1-D uint16/uint32"):
        make_dataset(DataConfig(source="npy", path=str(tmp_path / "f.npy")), 4)
    with pytest.raises(ValueError, match="no complete example"):
        Batches(TokenStream(np.arange(5), 8), 2)


def test_single_text_file_is_split_by_position(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("".join(f"line {i:04d}\n" for i in range(1000)))  # 10,000 bytes
    ds = make_dataset(DataConfig(source="text", path=str(f), val_percent=10), 16)
    assert len(ds.train.tokens) == 9000 and len(ds.val.tokens) == 1000
    assert bytes(ds.val.tokens[:10]) == b"line 0900\n"  # the last 10% of the file
    assert ds.train.num_examples > 0 and ds.val.num_examples > 0


def test_empty_split_says_why(tmp_path):
    (tmp_path / "d").mkdir()
    # Two files whose paths do not hash into validation (val_percent=2): the val split is empty.
    names = [n for n in (f"f{i}.txt" for i in range(100))
             if not in_validation(n, 2.0)][:2]  # fmt: skip
    for name in names:
        (tmp_path / "d" / name).write_text("some text " * 100)
    with pytest.raises(ValueError, match=r"the val split of .* no file was assigned to it"):
        make_dataset(DataConfig(source="text", path=str(tmp_path / "d")), 16)
    with pytest.raises(ValueError, match=r"train split .* has 980 tokens, fewer than --seq 1000"):
        make_dataset(DataConfig(source="text", path=str(tmp_path / "d" / names[0])), 1000)


def test_text_is_decoded_strictly_or_replaced_and_counted(tmp_path, caplog):
    d = tmp_path / "latin"
    d.mkdir()
    for i in range(30):
        (d / f"{i:02d}.txt").write_bytes(("café naïve " * 100).encode("latin-1"))
    # The split is a function of the path under the folder, so the first train file is fixed.
    first = next(f"{i:02d}" for i in range(30) if not in_validation(f"{i:02d}.txt", 20))
    with pytest.raises(
        ValueError,
        match=rf"/{first}\.txt: byte offset 3 is not UTF-8 .*0xe9.*--data\.errors replace",
    ):
        make_dataset(DataConfig(source="text", path=str(d), val_percent=20), 16)
    with caplog.at_level(logging.WARNING, logger="ttt_jax.data"):
        ds = make_dataset(
            DataConfig(source="text", path=str(d), val_percent=20, errors="replace"), 16
        )
    n_train = sum(not in_validation(f"{i:02d}.txt", 20) for i in range(30))
    assert f"{n_train * 200} undecodable bytes" in caplog.text  # 2 per repetition per file
    # each replaced byte becomes U+FFFD, 3 bytes of UTF-8
    assert len(ds.train.tokens) == n_train * 100 * (11 + 2 * 2)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: byte offset 28 is not UTF-8"):
        make_dataset(DataConfig(source="jsonl", path=str(bad)), 4)


def test_token_ids_and_eos_are_checked_against_the_vocab(tmp_path):
    np.save(tmp_path / "t.npy", (np.arange(5000) % 300).astype(np.uint16))
    cfg = DataConfig(source="npy", path=str(tmp_path / "t.npy"))
    with pytest.raises(ValueError, match=r"t\.npy: token id 299 .* at position 256\) is outside "
                       r"the model's vocab \[0, 256\): pass --model.vocab-size 300"):  # fmt: skip
        make_dataset(cfg, 16, vocab_size=256)
    assert make_dataset(cfg, 16, vocab_size=300).train.num_examples > 0
    np.save(tmp_path / "s.npy", np.array([1, 2, -5, 3] * 100, np.int32))
    with pytest.raises(ValueError, match=r"s\.npy: negative token id -5 at position 2"):
        make_dataset(DataConfig(source="npy", path=str(tmp_path / "s.npy")), 8, vocab_size=10)
    eos = DataConfig(source="npy", path=str(tmp_path / "t.npy"), eos_id=999)
    with pytest.raises(ValueError, match=r"eos_id=999 is outside the model's vocab \[0, 1000\)"
                       r"|eos_id=999 is outside the model's vocab \[0, 300\)"):  # fmt: skip
        make_dataset(eos, 16, vocab_size=300)
    with pytest.raises(ValueError, match="eos_id is only used by npy"):
        DataConfig(source="text", path=str(tmp_path), eos_id=3)
    with pytest.raises(ValueError, match="bytes tokenizer .* has 256 token ids, more than the "
                       "model's vocab \\(32\\)"):  # fmt: skip
        (tmp_path / "x.txt").write_text("hello " * 100)
        make_dataset(DataConfig(source="text", path=str(tmp_path / "x.txt")), 8, vocab_size=32)


def test_jsonl_text_field_must_be_a_string(tmp_path):
    f = tmp_path / "n.jsonl"
    f.write_text('{"text": "fine"}\n{"text": 12345}\n')
    with pytest.raises(ValueError, match=r"n\.jsonl:2: field 'text' is a int, not a string"):
        make_dataset(DataConfig(source="jsonl", path=str(f)), 4)
