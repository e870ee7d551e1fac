"""One sentence that can only end with ".": the action space of the sentence tasks (continuation, infilling).

Both embedded tokenizers write the sentence end as a token of its own: SmolLM2 has one "." token
(id 30), Gemma-3 two (ids 284 and 236761, both "."); every token whose text is exactly "." is a
stop. So that "." is the only way to end and every "." ends, the action space bans, in policy,
reward and baselines alike (``banned_token``; the paper's code bans the same kinds of tokens by a
hand-written list of GPT-2 tokens):

* special tokens (BOS, EOS, padding, chat markers): the sentence does not end there;
* line breaks, tabs; "!", "?", "…": other ways to end;
* quotes ``" “ ” « »``; "http", "www", "://";
* any other token containing ".": "..", " .", ".com", ".)", ".\\"" and the like;
* runs of two or more symbols (``$@#%^&|~*=_+<>\\/-``), and byte pieces that are not text on their own;
* abbreviations that a "." would follow inside a sentence: single capital letters A-Z but "A" and "I",
  and "Mr", "Mrs", "Ms", "Dr", "Prof", "Jr", "Sr", "St", "Av", "Ave", "US", "Inc", "Ltd", "vs",
  "etc", with or without a leading space (the paper's code bans only the forms without one).

That leaves 48,018 of SmolLM2's 49,152 tokens and 258,920 of Gemma-3's 262,144 (``allowed_tokens``).
"""

from __future__ import annotations

from gfnlm.exact import token_strings

SENTENCE_END = "."
OTHER_ENDS = ("\n", "\r", "\t", "!", "?", "…")
QUOTES = ('"', "“", "”", "«", "»")
LINKS = ("http", "www", "://")
SYMBOLS = set("$@#%^&|~*=_+<>\\/-")
ABBREVIATIONS = {"Mr", "Mrs", "Ms", "Dr", "Prof", "Jr", "Sr", "St", "Av", "Ave", "US", "Inc", "Ltd", "vs", "etc"}
KEPT_CAPITALS = {"A", "I"}


def banned_token(text: str) -> bool:
    """Whether a (non-special) token with this text may not appear in a sentence (module docstring)."""
    if text == SENTENCE_END:
        return False
    word = text.strip()
    return (
        not word
        or "\ufffd" in text  # a byte piece of a longer character
        or any(mark in text for mark in OTHER_ENDS + QUOTES)
        or any(link in text.lower() for link in LINKS)
        or SENTENCE_END in text
        or any(a in SYMBOLS and b in SYMBOLS for a, b in zip(text, text[1:]))
        or word in ABBREVIATIONS
        or (len(word) == 1 and word.isascii() and word.isupper() and word not in KEPT_CAPITALS)
    )


def allowed_tokens(tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The sentence-end tokens and the tokens a sentence may use, for this tokenizer."""
    special = set(tokenizer.all_special_ids)
    strings = {t: s for t, s in token_strings(tokenizer).items() if t not in special}
    stops = tuple(t for t, s in strings.items() if s == SENTENCE_END)
    if not stops:
        raise ValueError(f"the tokenizer has no {SENTENCE_END!r} token, which ends the sentence in this task")
    return stops, tuple(t for t, s in strings.items() if s != SENTENCE_END and not banned_token(s))
