"""Deterministic filler text with an exact token count.

Why: big trajectory sets stay tiny on disk when a message says "3,000 tokens of text" instead of
carrying the text, and a replayed trace must send prompts of exactly the recorded size. The same
``(n_tokens, seed)`` always gives the same text, in any process, so two agents that should share a
prefix (a common system prompt, a Mooncake block id) send byte-identical bytes and a prefix cache sees
exactly the intended reuse.

How the count is exact: the text is a sequence of pieces, each exactly one token for the simulator's
tokenizer (``agentperf_users.tokens``): a vocabulary word (at most 12 lowercase letters)
with its leading space, or a sentence-ending ``"."``. Whitespace costs nothing there, so paragraph
breaks are free, and any prefix of the pieces is a valid text of that many tokens (used to trim a
Mooncake block).

Why it is also realistic for a real model: every vocabulary word is a single token in OpenAI's
cl100k BPE both with and without its leading space (checked by ``tests/test_textgen.py``), so a real
tokenizer counts nearly the same number of tokens (a period merged with the following line break is
the only difference, within a few per cent).
"""

from __future__ import annotations

import json
import random
from typing import Hashable

SENTENCE_WORDS_MIN = 6
SENTENCE_WORDS_MAX = 18
PARAGRAPH_PROBABILITY = 0.2
"""Chance that a sentence ends its paragraph (a blank line follows)."""

ARGUMENTS_KEY = "command"
ARGUMENTS_OVERHEAD_TOKENS = 8
"""Tokens of ``{"command": ""}`` around generated tool-call arguments: ``{ " command " : " " }``."""

_VOCABULARY_TEXT = """
the of and to in is it that for on with as was at by be this are from or have an they which one you had not but
what all were when we there can been has more if will would who so no out up about into than them only other its
time then now look also some could these two may first way like use over such our well even back any new after
work most where much should must through before here good same under while last never very long those both each
between great little made just still around being another life few old without right again place part came off
going every world day year house thing case point group number problem fact hand system program question during
company state home water room mother area money story month book word business issue side kind head far black
white high small large next early young important public bad able low late hard major better sure free true
whole real best clear recent open full special easy personal strong possible private current similar simple
short local single common final main basic total general human social central file line code data value type
name list text path test error result output input user model server client request response message function
method class object module package import return default string integer boolean array index key map set get put
call run build check update create delete remove add insert find search read write load save parse format print
log debug trace warning info config option setting flag param argument variable constant field property
attribute element node tree graph edge root child parent item entry record row column table query cache buffer
stream queue stack pool thread process task job worker event handler callback listener hook signal channel
socket port host address network service endpoint route url header body status token session cookie account
admin role permission access auth login password secret hash random seed sample batch size length count limit
offset start end begin finish stop pause resume wait sleep timeout retry fail pass skip assert expect mock patch
fixture suite unit integration coverage report summary detail version release branch commit merge diff change
fix bug feature review ticket comment doc guide example demo template layout style theme color font image icon
button form label title page view screen window panel menu grid card link video audio media upload download
share copy paste move rename close lock unlock enable disable show hide toggle select filter sort order rank
score weight bias rate ratio mean median mode range scale step loop iter prev min max sum avg abs round floor
ceil sqrt pow exp sin cos tan pi float int str bool dict tuple none null false self super base abstract
interface protocol instance static protected async await yield lambda def var let const func proc struct enum
union trait impl mod crate pub mut ref ptr alloc malloc len cap slice vec box rc arc mutex atomic sync spawn
join fork exec shell bash command script binary source target compile deploy install upgrade setup init exit
abort panic throw catch raise except finally try else elif break continue switch match unless until"""

VOCABULARY: tuple[str, ...] = tuple(_VOCABULARY_TEXT.split())
"""Common English and programming words, each one token for the simulator and for cl100k (with and
without a leading space). Fixed here rather than computed so tiktoken stays a test-only dependency."""

_SPACED_WORDS = tuple(" " + word for word in VOCABULARY)


def filler_pieces(n_tokens: int, seed: Hashable, paragraphs: bool = True) -> list[str]:
    """``n_tokens`` one-token pieces whose concatenation is the filler text for ``seed``.

    Any prefix of the list is a text of exactly that many tokens. Sentences of 6-18 words end with a
    period; with ``paragraphs`` some sentences end with a blank line.
    """
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    rng = random.Random(seed)
    pieces = rng.choices(_SPACED_WORDS, k=n_tokens)
    uniform = rng.random
    span = SENTENCE_WORDS_MAX - SENTENCE_WORDS_MIN + 1
    period_at = -1
    while True:
        period_at += SENTENCE_WORDS_MIN + int(uniform() * span) + 1
        if period_at >= n_tokens:
            break
        pieces[period_at] = "."
        if paragraphs and uniform() < PARAGRAPH_PROBABILITY and period_at + 1 < n_tokens:
            pieces[period_at + 1] = "\n\n" + pieces[period_at + 1][1:]
    if pieces:
        pieces[0] = pieces[0].lstrip()
    return pieces


def filler(n_tokens: int, seed: Hashable, paragraphs: bool = True) -> str:
    """Text of exactly ``n_tokens`` simulator tokens, the same for the same ``seed``."""
    return "".join(filler_pieces(n_tokens, seed, paragraphs))


def tool_arguments(n_tokens: int, seed: Hashable) -> str:
    """A tool call's JSON ``arguments`` string of exactly ``n_tokens`` simulator tokens.

    It is ``{"command": "<filler>"}`` on one line (no line breaks, which JSON would escape into extra
    tokens); ``n_tokens`` must be at least :data:`ARGUMENTS_OVERHEAD_TOKENS`.
    """
    if n_tokens < ARGUMENTS_OVERHEAD_TOKENS:
        raise ValueError(f"tool arguments need at least {ARGUMENTS_OVERHEAD_TOKENS} tokens, got {n_tokens}")
    text = filler(n_tokens - ARGUMENTS_OVERHEAD_TOKENS, seed, paragraphs=False)
    return json.dumps({ARGUMENTS_KEY: text})
