"""Binary token-level probing tasks built from plain text by documented rules, and user tasks from JSONL.

Gao et al. (2024, §4.3) measure how well single SAE latents "pick out" features that humans would name, with
61 labelled binary tasks. Their data sets are not public, so saeforge builds tasks from *any* text by the rules
below. Every rule marks **character spans** of the text; a token is a positive example of the task when its
character range overlaps a span (see :func:`token_labels`). Rules pick spans so that the intended token is the
one that overlaps: e.g. ``sentence_start`` marks only the first character of a sentence's first word.

Rules (words match case-insensitively on whole words ``[A-Za-z]+`` unless noted):

==================  ============================================================================================
task                positive characters
==================  ============================================================================================
inside_quotes       text strictly between a pair of double quotes (``"`` or curly quotes), quotes excluded
sentence_start      first character of the first word of a sentence (text start, or after ``.!?`` + space)
capitalised_mid     first character of a capitalised word that does not start a sentence (not ``I``)
digit               every digit ``0-9``
punctuation         every character of ``.,!?;:"'()-`` (and curly quotes)
comma               every ``,``
sentence_end        every ``.``, ``!`` or ``?``
pronoun             whole pronoun words (I, me, you, he, him, she, her, it, we, us, they, them, ...)
past_ed             the final ``ed`` of words of >= 4 letters ending in ``ed``
plural_s            the final ``s`` of words of >= 4 letters ending in ``s`` but not ``ss``/``us``/``is``
                    (common non-plurals such as ``was``, ``this``, ``his`` are excluded)
ing_word            the final ``ing`` of words of >= 5 letters ending in ``ing``
ly_word             the final ``ly`` of words of >= 5 letters ending in ``ly``
colour              whole colour words; animal / emotion / family / food / place / size / time words likewise
after_the           first character of the word right after the word ``the``
after_comma         first character of the word right after a comma
article             whole words a, an, the
preposition         whole prepositions (in, on, at, under, over, with, ...)
conjunction         whole conjunctions (and, but, or, so, because, ...)
negation            no, not, never, nothing, nobody, none, and words ending in ``n't``
speech_verb         said, asked, replied, shouted, whispered, ...
number_word         one ... twelve, hundred, first, second, third
question_sentence   every character of a sentence that ends with ``?``
exclaim_sentence    every character of a sentence that ends with ``!``
long_word           every character of words of >= 8 letters
==================  ============================================================================================

User tasks come from a JSONL file, one object per line: ``{"task": NAME, "text": STR, "spans": [[start, end],
...]}`` (``spans`` may also be objects ``{"start": s, "end": e}``; ``task`` defaults to the file's stem). Spans are
half-open character ranges of ``text``. All tokens of the text that overlap no span are negatives.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from saeforge.errors import SaeforgeError

Span = tuple[int, int]

_WORD = re.compile(r"[A-Za-z]+")
_ALNUM = re.compile(r"[A-Za-z0-9]")
_SENT_BOUNDARY = re.compile(r"[.!?]+[\"'\u201d\u2019]*\s+")
_QUOTES = "\"\u201c\u201d"
_PUNCT = set(".,!?;:\"'()-\u201c\u201d\u2018\u2019")

WORDS: dict[str, frozenset[str]] = {
    "pronoun": frozenset("i me my mine you your yours he him his she her hers it its we us our ours they them their "
                         "theirs myself yourself himself herself itself ourselves themselves".split()),
    "colour": frozenset("red blue green yellow orange purple pink brown black white gray grey gold golden silver "
                        "colorful colourful".split()),
    "animal": frozenset("cat cats dog dogs bird birds fish fishes bear bears rabbit rabbits bunny bunnies mouse mice "
                        "duck ducks frog frogs lion lions cow cows horse horses pig pigs sheep monkey monkeys fox "
                        "foxes owl owls bee bees bug bugs puppy puppies kitty kitten kittens elephant elephants "
                        "squirrel squirrels snake snakes turtle turtles deer giraffe zebra tiger tigers wolf "
                        "dinosaur dragon butterfly chicken hen".split()),
    "emotion": frozenset("happy sad angry scared afraid excited glad upset mad proud sorry worried surprised "
                         "love loved loves fear joy happily sadly lonely brave nervous calm curious jealous "
                         "grumpy cheerful".split()),
    "family": frozenset("mom mommy mum mother dad daddy father sister brother grandma grandpa granny baby family "
                        "parents friend friends aunt uncle son daughter".split()),
    "food": frozenset("apple apples cake cookie cookies bread candy pie soup milk juice ice cream banana bananas "
                      "carrot carrots food lunch dinner breakfast sandwich pizza honey cheese egg eggs".split()),
    "place": frozenset("park house home school garden forest tree trees room kitchen beach sea river lake town "
                       "city shop store farm yard sky hill mountain".split()),
    "size": frozenset("big small little tiny huge large tall short long giant".split()),
    "time_word": frozenset("day days night morning evening today tomorrow yesterday time once later soon then "
                           "always never week year".split()),
    "article": frozenset("a an the".split()),
    "preposition": frozenset("in on at under over with to from into onto by for of up down near behind "
                             "through around above below inside outside".split()),
    "conjunction": frozenset("and but or so because if when while although".split()),
    "negation": frozenset("no not never nothing nobody none nowhere".split()),
    "speech_verb": frozenset("said says say asked asks replied shouted whispered yelled cried exclaimed called "
                             "answered told".split()),
    "number_word": frozenset("one two three four five six seven eight nine ten eleven twelve hundred first second "
                             "third".split()),
}
_NOT_PLURAL = frozenset("was has his this is its us yes as does goes always sometimes perhaps across besides "
                        "himself herself itself bus dress grass glass kiss miss boss yours ours hers theirs "
                        "cannot lots".split())


# ---- rule helpers ----------------------------------------------------------------------------------------------
def _words(text: str) -> list[re.Match]:
    return list(_WORD.finditer(text))


def _word_list(key: str) -> Callable[[str], list[Span]]:
    vocab = WORDS[key]

    def rule(text: str) -> list[Span]:
        spans = [m.span() for m in _words(text) if m.group().lower() in vocab]
        if key == "negation":  # don't, can't, didn't: the whole contraction
            spans += [m.span() for m in re.finditer(r"[A-Za-z]+n't", text)]
        return spans

    return rule


def _suffix_rule(suffix: str, min_len: int, exclude: Callable[[str], bool] = lambda w: False):
    def rule(text: str) -> list[Span]:
        out = []
        for m in _words(text):
            w = m.group().lower()
            if len(w) >= min_len and w.endswith(suffix) and not exclude(w):
                out.append((m.end() - len(suffix), m.end()))
        return out

    return rule


def _plural_excluded(w: str) -> bool:
    return w.endswith(("ss", "us", "is")) or w in _NOT_PLURAL or w in WORDS["pronoun"]


def sentences(text: str) -> list[Span]:
    """Sentence spans: a sentence ends after ``.!?`` (plus closing quotes); the boundary whitespace is dropped."""
    out, start = [], 0
    for m in _SENT_BOUNDARY.finditer(text):
        end = m.end() - len(m.group()) + len(m.group().rstrip())
        if end > start:
            out.append((start, end))
        start = m.end()
    if start < len(text) and text[start:].strip():
        out.append((start, len(text.rstrip())))
    return out


def _sentence_first_chars(text: str) -> set[int]:
    firsts = set()
    for s, e in sentences(text):
        m = _ALNUM.search(text, s, e)
        if m is not None:
            firsts.add(m.start())
    return firsts


def rule_inside_quotes(text: str) -> list[Span]:
    spans, open_at = [], None
    for i, ch in enumerate(text):
        if ch in _QUOTES:
            if open_at is None:
                open_at = i + 1
            else:
                if i > open_at:
                    spans.append((open_at, i))
                open_at = None
    if open_at is not None and open_at < len(text):
        spans.append((open_at, len(text)))  # an unclosed quote runs to the end of the text
    return spans


def rule_sentence_start(text: str) -> list[Span]:
    return [(i, i + 1) for i in sorted(_sentence_first_chars(text))]


def rule_capitalised_mid(text: str) -> list[Span]:
    firsts = _sentence_first_chars(text)
    return [(m.start(), m.start() + 1) for m in _words(text)
            if m.group()[0].isupper() and m.start() not in firsts and m.group() != "I"]


def _chars(pred: Callable[[str], bool]) -> Callable[[str], list[Span]]:
    return lambda text: [(i, i + 1) for i, ch in enumerate(text) if pred(ch)]


def _after_word(word: str) -> Callable[[str], list[Span]]:
    def rule(text: str) -> list[Span]:
        ws = _words(text)
        return [(b.start(), b.start() + 1) for a, b in zip(ws, ws[1:]) if a.group().lower() == word]

    return rule


def rule_after_comma(text: str) -> list[Span]:
    return [(m.end() - 1, m.end()) for m in re.finditer(r",\s*[\"\u201c]?[A-Za-z0-9]", text)]


def _sentence_ending(mark: str) -> Callable[[str], list[Span]]:
    def rule(text: str) -> list[Span]:
        return [(s, e) for s, e in sentences(text) if text[s:e].rstrip("\"'\u201d\u2019").endswith(mark)]

    return rule


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    rule: Callable[[str], list[Span]]

    def spans(self, text: str) -> list[Span]:
        return self.rule(text)


def _wl(name: str, what: str) -> Task:
    return Task(name, f"whole {what} words", _word_list(name))


BUILTIN_TASKS: tuple[Task, ...] = (
    Task("inside_quotes", "text between double quotes", rule_inside_quotes),
    Task("sentence_start", "first token of a sentence", rule_sentence_start),
    Task("capitalised_mid", "capitalised word not at a sentence start", rule_capitalised_mid),
    Task("digit", "digits", _chars(str.isdigit)),
    Task("punctuation", "punctuation characters", _chars(lambda c: c in _PUNCT)),
    Task("comma", "commas", _chars(lambda c: c == ",")),
    Task("sentence_end", "sentence-final . ! ?", _chars(lambda c: c in ".!?")),
    _wl("pronoun", "pronoun"),
    Task("past_ed", "final -ed of past-tense-looking words", _suffix_rule("ed", 4)),
    Task("plural_s", "final -s of plural-looking words", _suffix_rule("s", 4, _plural_excluded)),
    Task("ing_word", "final -ing of words", _suffix_rule("ing", 5)),
    Task("ly_word", "final -ly of words", _suffix_rule("ly", 5)),
    _wl("colour", "colour"),
    _wl("animal", "animal"),
    _wl("emotion", "emotion"),
    _wl("family", "family/person"),
    _wl("food", "food"),
    _wl("place", "place/nature"),
    _wl("size", "size"),
    _wl("time_word", "time"),
    Task("after_the", "word right after 'the'", _after_word("the")),
    Task("after_comma", "word right after a comma", rule_after_comma),
    _wl("article", "article"),
    _wl("preposition", "preposition"),
    _wl("conjunction", "conjunction"),
    Task("negation", "negation words", _word_list("negation")),
    _wl("speech_verb", "speech verb"),
    _wl("number_word", "number"),
    Task("question_sentence", "sentences ending in ?", _sentence_ending("?")),
    Task("exclaim_sentence", "sentences ending in !", _sentence_ending("!")),
    Task("long_word", "words of 8+ letters", lambda t: [m.span() for m in _words(t) if len(m.group()) >= 8]),
)


# ---- tokens <-> characters -------------------------------------------------------------------------------------
def token_char_spans(tokenizer, ids: Sequence[int]) -> tuple[str, list[Span]]:
    """``(text, spans)``: ``text = tokenizer.decode(ids)`` and each token's half-open character range in it.

    Fast path: the tokens' display pieces (``token_str``) concatenate to the text -- possibly with one extra
    leading space, the SentencePiece/llama2.c dummy prefix that ``decode`` drops. Otherwise (byte-fallback pieces,
    tokenizers whose pieces are not literal text) the offsets come from incremental decoding: token ``i`` ends at
    ``len(decode(ids[:i+1]))``. Special tokens (BOS, EOS, ...) get empty spans.
    """
    ids = [int(i) for i in ids]
    special = set(getattr(tokenizer, "special_ids", ()) or ())
    text = tokenizer.decode(ids)
    pieces = ["" if i in special else tokenizer.token_str(i) for i in ids]
    joined = "".join(pieces)
    shift = 0 if joined == text else (1 if joined[:1] == " " and joined[1:] == text else None)
    spans: list[Span] = []
    if shift is not None:
        pos = -shift
        for p in pieces:
            spans.append((max(pos, 0), max(pos + len(p), 0)))
            pos += len(p)
        return text, spans
    prev = 0
    for n in range(1, len(ids) + 1):
        end = prev if ids[n - 1] in special else len(tokenizer.decode(ids[:n]))
        end = max(end, prev)
        spans.append((prev, end))
        prev = end
    return text, spans


def char_mask(n_chars: int, spans: Sequence[Span]) -> np.ndarray:
    mask = np.zeros(n_chars, dtype=bool)
    for s, e in spans:
        mask[max(0, s):max(0, min(e, n_chars))] = True
    return mask


def token_labels(token_spans: Sequence[Span], spans: Sequence[Span], n_chars: int) -> np.ndarray:
    """Bool per token: does its character range overlap any labelled span?"""
    cs = np.concatenate([[0], np.cumsum(char_mask(n_chars, spans))])
    ts = np.asarray(token_spans, dtype=np.int64).reshape(-1, 2).clip(0, n_chars)
    return (cs[ts[:, 1]] - cs[ts[:, 0]]) > 0


# ---- user tasks --------------------------------------------------------------------------------------------------
@dataclass
class TextExample:
    text: str
    spans: list[Span]


def _parse_span(s, where: str, n: int) -> Span:
    if isinstance(s, dict) and "start" in s and "end" in s:
        a, b = s["start"], s["end"]
    elif isinstance(s, (list, tuple)) and len(s) == 2:
        a, b = s
    else:
        raise SaeforgeError(f"{where}: span {s!r} is not [start, end] or {{'start':..,'end':..}}; fix the span list")
    if not (isinstance(a, int) and isinstance(b, int)) or not 0 <= a <= b <= n:
        raise SaeforgeError(f"{where}: span {s!r} is not a character range inside the text (length {n}); fix it")
    return (a, b)


def read_jsonl_tasks(path: str | Path) -> dict[str, list[TextExample]]:
    """Read user tasks: ``{task: [TextExample, ...]}`` in file order (see the module docstring for the format)."""
    path = Path(path)
    if not path.is_file():
        raise SaeforgeError(f"probe task file {path} does not exist; pass a JSONL file of text + labelled spans")
    tasks: dict[str, list[TextExample]] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SaeforgeError(f"{where} is not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise SaeforgeError(f"{where} needs an object with a string 'text' field and a 'spans' list")
            spans = row.get("spans", [])
            if not isinstance(spans, list):
                raise SaeforgeError(f"{where}: 'spans' must be a list of [start, end] pairs")
            name = str(row.get("task", path.stem))
            text = row["text"]
            tasks.setdefault(name, []).append(TextExample(text, [_parse_span(s, where, len(text)) for s in spans]))
    if not tasks:
        raise SaeforgeError(f"{path} holds no tasks; write one JSON object per line with text and spans")
    return tasks
