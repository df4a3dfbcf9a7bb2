"""The one tokenizer interface saeforge uses, with two implementations.

* :class:`Llama2cTokenizer` reads a llama2.c ``tokenizer.bin`` and encodes exactly as llama2.c's ``encode``
  (run.c) does, but with a heap + linked list instead of llama2.c's O(n^2) rescan.
* :class:`HFTokenizer` wraps a ``transformers.AutoTokenizer``.

Everything else in saeforge (harvesting, dashboards, evaluation) only touches the :class:`Tokenizer` protocol:
``encode``/``decode``, ``token_str`` for showing one token, and ``special_ids`` for the positions that must never
become SAE training rows (BOS/EOS/pad/CLS/SEP/UNK activations are outliers that swamp SAE training).
"""
from __future__ import annotations

import heapq
import re
import struct
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

from saeforge.errors import SaeforgeError


@runtime_checkable
class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    vocab_size: int
    special_ids: frozenset[int]

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_str(self, id: int) -> str: ...


_BYTE_PIECE = re.compile(rb"^<0x([0-9A-Fa-f]{2})>$")


class Llama2cTokenizer:
    """llama2.c tokenizer (``tokenizer.bin``: int32 max_token_length, then per token float32 score, int32 length, bytes).

    Ids 0, 1, 2 are ``<unk>``, BOS, EOS; ids 3..258 are the byte fallbacks ``<0x00>``..``<0xFF>``.
    Reference: ``encode``/``decode`` in https://github.com/karpathy/llama2.c/blob/master/run.c.
    """

    unk_id = 0

    def __init__(self, path: str | Path, vocab_size: int | None = None):
        path = Path(path)
        if not path.is_file():
            raise SaeforgeError(f"llama2.c tokenizer file not found: {path}; pass --tokenizer PATH to a tokenizer .bin")
        data = path.read_bytes()
        if len(data) < 4:
            raise SaeforgeError(f"{path} is too short to be a llama2.c tokenizer .bin; pass the right --tokenizer file")
        (self.max_token_length,) = struct.unpack_from("<i", data, 0)
        pieces: list[bytes] = []
        scores: list[float] = []
        off = 4
        while off < len(data) and (vocab_size is None or len(pieces) < vocab_size):
            if off + 8 > len(data):
                raise SaeforgeError(f"{path} is truncated at byte {off}; it is not a valid llama2.c tokenizer .bin")
            score, n = struct.unpack_from("<fi", data, off)
            off += 8
            if n < 0 or off + n > len(data):
                raise SaeforgeError(f"{path} has a bad token length {n} at byte {off - 4}; not a llama2.c tokenizer .bin")
            pieces.append(data[off : off + n])
            scores.append(score)
            off += n
        if vocab_size is not None and len(pieces) != vocab_size:
            raise SaeforgeError(f"{path} holds {len(pieces)} tokens but the model expects {vocab_size}; pass the matching --tokenizer")
        if len(pieces) < 259:
            raise SaeforgeError(f"{path} holds only {len(pieces)} tokens (need >= 259: 3 specials + 256 bytes); wrong --tokenizer file")
        self.path = path
        self.pieces = pieces
        self.scores = scores
        self.vocab_size = len(pieces)
        self.bos_id, self.eos_id = 1, 2
        self.pad_id = self.eos_id  # llama2.c has no pad token; EOS is masked out everywhere anyway
        self.special_ids = frozenset({self.unk_id, self.bos_id, self.eos_id})
        # str_lookup in run.c is a bsearch over the sorted vocab; with unique pieces a dict is the same map.
        self._lookup: dict[bytes, int] = {}
        for i, p in enumerate(pieces):
            self._lookup.setdefault(p, i)
        self._byte_val = [None] * len(pieces)
        for i, p in enumerate(pieces):
            m = _BYTE_PIECE.match(p)
            if m:
                self._byte_val[i] = int(m.group(1), 16)
        self._space_id = self._lookup.get(b" ")
        self._pair_cache: dict[tuple[int, int], int] = {}
        # If no piece has a space after its first byte, no merge can cross the boundary in front of a space, so
        # greedy merging on each space-led chunk separately gives the same result as on the whole text (ties
        # break leftmost in both) -- and repeated words can be cached.
        self._chunkable = all(b" " not in p[1:] for p in pieces) and not any(
            p.startswith(pieces[self.bos_id]) and i != self.bos_id for i, p in enumerate(pieces)
        )
        self._chunk_cache: dict[str, list[int]] = {}

    # ---- encoding -------------------------------------------------------------------------------------------
    def _char_ids(self, text: str) -> list[int]:
        """Per-UTF-8-character lookup with byte fallback (ids 3 + byte), as run.c's first loop."""
        out: list[int] = []
        lookup = self._lookup
        for ch in text:
            b = ch.encode("utf-8", "replace")
            tid = lookup.get(b)
            if tid is not None:
                out.append(tid)
            else:
                out.extend(x + 3 for x in b)
        return out

    def _pair(self, a: int, b: int) -> int:
        key = (a, b)
        got = self._pair_cache.get(key)
        if got is None:
            got = self._lookup.get(self.pieces[a] + self.pieces[b], -1)
            self._pair_cache[key] = got
        return got

    def merge(self, tokens: list[int]) -> list[int]:
        """Greedy BPE: repeatedly merge the adjacent pair whose merged piece has the highest score.

        Same choice as run.c (strictly greater score wins, so ties go to the leftmost pair) in O(n log n): a heap of
        candidate pairs keyed (-score, left position), and a doubly linked list over positions. A left position
        keeps its index when it absorbs its right neighbour, so list order equals index order and the leftmost tie
        rule is preserved. Stale heap entries are skipped by checking both ends still hold the same tokens.
        """
        n = len(tokens)
        if n < 2:
            return list(tokens)
        tok = list(tokens)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        alive = [True] * n
        scores = self.scores
        heap: list[tuple[float, int, int, int, int]] = []

        def push(i: int) -> None:
            j = nxt[i]
            if j >= 0:
                mid = self._pair(tok[i], tok[j])
                if mid >= 0:
                    heapq.heappush(heap, (-scores[mid], i, tok[i], j, tok[j]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, ti, j, tj = heapq.heappop(heap)
            if not alive[i] or not alive[j] or nxt[i] != j or tok[i] != ti or tok[j] != tj:
                continue
            tok[i] = self._pair(ti, tj)
            alive[j] = False
            k = nxt[j]
            nxt[i] = k
            if k >= 0:
                prv[k] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        return [tok[i] for i in range(n) if alive[i]]

    def _encode_chunk(self, chunk: str) -> list[int]:
        got = self._chunk_cache.get(chunk)
        if got is None:
            got = self.merge(self._char_ids(chunk))
            if len(self._chunk_cache) > 200_000:
                self._chunk_cache.clear()
            self._chunk_cache[chunk] = got
        return got

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """llama2.c ``encode(text, bos=add_bos, eos=0)``: dummy-prefix space, char/byte lookup, greedy merges."""
        out = [self.bos_id] if add_bos else []
        if not text:
            return out
        if self._space_id is None:
            raise SaeforgeError(f"{self.path} has no ' ' token for llama2.c's dummy prefix; it is not a llama2.c tokenizer")
        if not self._chunkable:
            return self.merge(out + [self._space_id] + self._char_ids(text))
        # The dummy prefix is a separate " " token in run.c; it merges exactly like a leading space in the text.
        s = " " + text
        start = 0
        while True:
            nxt_space = s.find(" ", start + 1)
            if nxt_space < 0:
                out.extend(self._encode_chunk(s[start:]))
                return out
            out.extend(self._encode_chunk(s[start:nxt_space]))
            start = nxt_space

    # ---- decoding -------------------------------------------------------------------------------------------
    def _piece_bytes(self, tid: int) -> bytes:
        if not 0 <= tid < self.vocab_size:
            raise SaeforgeError(f"token id {tid} is outside the vocabulary [0, {self.vocab_size}); check the ids or the tokenizer")
        bv = self._byte_val[tid]
        return bytes([bv]) if bv is not None else self.pieces[tid]

    def decode(self, ids: Sequence[int]) -> str:
        """Concatenate pieces; byte tokens become their byte; BOS/EOS render as nothing.

        Like SentencePiece (and run.c after BOS), the leading space of the first real token is dropped, so
        ``decode(encode(s)) == s``.
        """
        out = bytearray()
        first = True
        for tid in ids:
            tid = int(tid)
            if tid in (self.bos_id, self.eos_id):
                first = True
                continue
            piece = self._piece_bytes(tid)
            if first and piece.startswith(b" "):
                piece = piece[1:]
            first = False
            out += piece
        return out.decode("utf-8", errors="replace")

    def token_str(self, id: int) -> str:
        """Readable piece for dashboards: ``" the"``, ``"<0x0A>"`` -> ``"\\n"``, BOS -> ``"<s>"``."""
        id = int(id)
        if id == self.bos_id:
            return "<s>"
        if id == self.eos_id:
            return "</s>"
        bv = self._byte_val[id] if 0 <= id < self.vocab_size else None
        if bv is not None:
            return chr(bv) if bv < 0x80 else self.pieces[id].decode("ascii")
        return self._piece_bytes(id).decode("utf-8", errors="replace")


class HFTokenizer:
    """Adapter from a ``transformers`` tokenizer to :class:`Tokenizer`.

    ``add_bos`` maps to ``add_special_tokens``; for BERT-style tokenizers the ``[CLS]`` token plays the role of BOS
    (and ``[SEP]`` is appended). Tokenizers that never add a BOS themselves (GPT-2) get their BOS prepended, the
    same convention as TransformerLens/SAELens ``prepend_bos=True``: the first position is then an attention sink
    that saeforge drops from training instead of a real token with outlier activations.
    """

    def __init__(self, hf_tokenizer: Any):
        self.hf = hf_tokenizer
        t = hf_tokenizer
        self.bos_id = t.bos_token_id if t.bos_token_id is not None else getattr(t, "cls_token_id", None)
        self.eos_id = t.eos_token_id if t.eos_token_id is not None else getattr(t, "sep_token_id", None)
        pad = t.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.vocab_size = len(t)
        special = set(getattr(t, "all_special_ids", []) or [])
        special.update(i for i in (self.bos_id, self.eos_id, t.pad_token_id) if i is not None)
        self.special_ids = frozenset(int(i) for i in special)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> "HFTokenizer":
        from transformers import AutoTokenizer

        try:
            return cls(AutoTokenizer.from_pretrained(str(name_or_path)))
        except (OSError, ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SaeforgeError(
                f"cannot load a tokenizer from {str(name_or_path)!r} ({first[:200]}); pass --tokenizer PATH_OR_HUB_ID"
            ) from None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(self.hf(text, add_special_tokens=add_bos)["input_ids"])
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def token_str(self, id: int) -> str:
        raw = self.hf.convert_ids_to_tokens(int(id))
        if raw is None:
            raise SaeforgeError(f"token id {id} is outside the vocabulary of size {self.vocab_size}; check the ids")
        if int(id) in self.special_ids:
            return raw
        if self._wordpiece:
            # WordPiece marks word *continuations* with "##": "##ing" reads "ing" glued to the previous token,
            # any other token starts a new word, so it reads with the space before it
            # (punctuation reads glued to the word before it, as HF's own clean-up decodes it)
            if raw.startswith("##"):
                return raw[2:]
            return raw if raw in _GLUED_PUNCT else " " + raw
        text = self.hf.decode([int(id)], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        # SentencePiece-style decoders strip the leading "▁" of a lone token; keep the space for display.
        if raw.startswith(("▁", "Ġ")) and not text.startswith(" "):
            text = " " + text
        return text

    @property
    def _wordpiece(self) -> bool:
        backend = getattr(self.hf, "backend_tokenizer", None)
        return backend is not None and type(backend.model).__name__ == "WordPiece"


_GLUED_PUNCT = frozenset(".,!?;:%)]}'\"")


def load_tokenizer(path_or_id: str | Path, vocab_size: int | None = None) -> Tokenizer:
    """A ``.bin`` file is a llama2.c tokenizer; anything else goes to ``AutoTokenizer``."""
    p = Path(path_or_id)
    if p.suffix == ".bin" or p.is_file():
        return Llama2cTokenizer(p, vocab_size=vocab_size)
    return HFTokenizer.from_pretrained(path_or_id)
