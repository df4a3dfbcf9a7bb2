"""Text readers and SAELens-style packing, checked on hand-worked tiny cases."""
from __future__ import annotations

import gzip
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from saeforge.data import batch_contexts, iter_documents, pack
from saeforge.errors import SaeforgeError


class CharTokenizer:
    """One token per character: 'a' -> 10, 'b' -> 11, ...; '#' -> EOS. BOS 1, EOS 2, pad 0."""

    bos_id, eos_id, pad_id = 1, 2, 0
    vocab_size = 40
    special_ids = frozenset({0, 1, 2})

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [self.eos_id if c == "#" else ord(c) - ord("a") + 10 for c in text]
        return ([self.bos_id] if add_bos else []) + ids


# ---------------------------------------------------------------------------------------------- text


def test_txt_blank_line_documents(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first doc\nstill first\n\n\n  second  \n \t \nthird\n")
    assert list(iter_documents(str(f))) == ["first doc\nstill first", "second", "third"]


def test_jsonl_and_gzip(tmp_path):
    rows = [{"text": "alpha", "id": 1}, {"text": "beta", "id": 2}, {"text": "", "id": 3}]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert list(iter_documents(str(f))) == ["alpha", "beta"]
    g = tmp_path / "d.jsonl.gz"
    with gzip.open(g, "wt") as fh:
        fh.write("\n".join(json.dumps({"body": r["text"]}) for r in rows))
    assert list(iter_documents(str(g), text_field="body")) == ["alpha", "beta"]


def test_jsonl_missing_field_names_the_keys(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"content": "x", "meta": 1}) + "\n")
    with pytest.raises(SaeforgeError) as e:
        list(iter_documents(str(f)))
    msg = str(e.value)
    assert "'text'" in msg and "content" in msg and "meta" in msg and "--text-field" in msg and "\n" not in msg


def test_parquet_in_batches(tmp_path):
    docs = [f"document number {i}" for i in range(2500)]
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": docs, "n": list(range(2500))}), f, row_group_size=700)
    assert list(iter_documents(str(f))) == docs
    with pytest.raises(SaeforgeError, match="no column 'body'"):
        list(iter_documents(str(f), text_field="body"))


def test_directory_is_read_in_sorted_order(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "from b"}) + "\n")
    (tmp_path / "a.txt").write_text("from a 1\n\nfrom a 2\n")
    (tmp_path / "sub").mkdir()
    pq.write_table(pa.table({"text": ["from c"]}), tmp_path / "sub" / "c.parquet")
    (tmp_path / "notes.md").write_text("ignored")
    assert list(iter_documents(str(tmp_path))) == ["from a 1", "from a 2", "from b", "from c"]


def test_saved_hf_dataset_folder(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["one", "two"], "x": [1, 2]}).save_to_disk(str(tmp_path / "ds"))
    assert list(iter_documents(str(tmp_path / "ds"))) == ["one", "two"]


def test_missing_file_is_one_line_error(tmp_path):
    with pytest.raises(SaeforgeError) as e:
        list(iter_documents(str(tmp_path / "nope.txt")))
    assert "does not exist" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- packing


def _rows(ctx):
    return ctx.tokens.tolist(), ctx.doc.tolist(), ctx.pos.tolist(), ctx.keep.tolist()


B, P = 1, 0
a, b, c, d, e, f, g, h, i, j = range(10, 20)


def test_pack_hand_worked():
    # stream: B a b c | B d e | B f g h i j   (docs 0, 1, 2)
    docs = ["abc", "de", "fghij"]
    out = [_rows(x) for x in pack(docs, CharTokenizer(), context_len=4)]
    assert out == [
        ([B, a, b, c], [0, 0, 0, 0], [0, 1, 2, 3], [False, True, True, True]),
        ([B, d, e, B], [1, 1, 1, 2], [0, 1, 2, 0], [False, True, True, False]),
        # window starts at 'f', not BOS: BOS prepended, 3 fresh tokens
        ([B, f, g, h], [2, 2, 2, 2], [0, 1, 2, 3], [False, True, True, True]),
    ]  # the partial window "B i j" is dropped
    padded = [_rows(x) for x in pack(docs, CharTokenizer(), context_len=4, drop_last=False)]
    assert padded[:3] == out
    assert padded[3] == ([B, i, j, P], [2, 2, 2, -1], [0, 4, 5, -1], [False, True, True, False])


def test_pack_without_bos_and_keep_special():
    tok = CharTokenizer()
    out = [_rows(x) for x in pack(["abc", "de", "fghij"], tok, context_len=4, add_bos=False, drop_last=False)]
    assert [o[0] for o in out] == [[a, b, c, d], [e, f, g, h], [i, j, P, P]]
    assert out[1][1:3] == ([1, 2, 2, 2], [1, 0, 1, 2])
    assert out[2][3] == [True, True, False, False]
    # '#' is EOS (a special id): excluded unless keep_special; BOS kept with keep_special, padding never.
    (ctx,) = pack(["a#b"], tok, context_len=4)
    assert ctx.keep.tolist() == [False, True, False, True]
    (ctx,) = pack(["a#b", "c"], tok, context_len=4, keep_special=True)
    assert ctx.keep.tolist() == [True, True, True, True]
    (ctx,) = pack(["ab"], tok, context_len=4, keep_special=True, drop_last=False)
    assert _rows(ctx) == ([B, a, b, P], [0, 0, 0, -1], [0, 1, 2, -1], [True, True, True, False])


def _naive_pack(docs, tok, T):
    """Reference: materialise the whole stream, then cut windows (BOS prepended when missing)."""
    stream = []
    for k, text in enumerate(docs):
        ids = tok.encode(text)
        stream += [(t, k, p) for p, t in enumerate(ids)]
    out, s = [], 0
    while s < len(stream):
        if stream[s][0] == tok.bos_id:
            win = stream[s:s + T]
            s += T
        else:
            win = [(tok.bos_id, stream[s][1], 0)] + stream[s:s + T - 1]
            s += T - 1
        if len(win) == T:
            out.append(win)
    return out


def test_pack_matches_naive_reference_on_random_docs():
    rng = random.Random(0)
    docs = ["".join(rng.choice("abcdefg#") for _ in range(rng.randint(1, 30))) for _ in range(60)]
    tok = CharTokenizer()
    for T in (2, 5, 16):
        got = [list(zip(*_rows(x)[:3])) for x in pack(docs, tok, context_len=T)]
        assert got == _naive_pack(docs, tok, T)
        assert all(len(w) == T for w in got)


def test_batch_contexts_stacks_and_keeps_remainder():
    ctxs = list(pack(["abcdefghij"] * 3, CharTokenizer(), context_len=5))
    batches = list(batch_contexts(ctxs, 4))
    assert [bt[0].shape for bt in batches] == [torch.Size([4, 5]), torch.Size([len(ctxs) - 4, 5])]
    assert torch.equal(batches[0][0][1], ctxs[1].tokens) and batches[1][3].dtype == torch.bool
    with pytest.raises(SaeforgeError):
        list(pack(["ab"], CharTokenizer(), context_len=1))
