"""Merlin's text normalisation, applied to reports and prompts alike.

Merlin lowercases, splits with NLTK's ``wordpunct_tokenize`` and re-joins with single
spaces ("Liver: Normal." -> "liver : normal ."). ``wordpunct_tokenize`` is exactly the
regular expression below (runs of word characters, or runs of non-space non-word
characters); it is written out here so that the deploy image does not carry NLTK for one
regex. ``tests/deploy/test_textnorm.py`` checks parity with NLTK where NLTK is installed.
"""

from __future__ import annotations

import re

_WORDPUNCT = re.compile(r"\w+|[^\w\s]+")


def wordpunct_tokens(text: str) -> list[str]:
    """Tokens as NLTK's ``wordpunct_tokenize`` would return them."""
    return _WORDPUNCT.findall(text)


def normalize_text(text: str) -> str:
    """Lowercase, word/punctuation split, single spaces."""
    return " ".join(wordpunct_tokens(text.lower()))
