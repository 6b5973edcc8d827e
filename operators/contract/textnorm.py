"""Merlin's text normalisation, applied to reports and prompts alike; and which sentences state a finding.

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


NORMAL_STATEMENTS = {
    "normal",
    "unremarkable",
    "within normal limits",
    "normal in appearance",
    "normal appearance",
    "no abnormality",
    "no abnormalities",
    "no acute abnormality",
    "no significant abnormality",
    "negative",
    "normal limits",
    "no acute findings",
    "grossly unremarkable",
    "grossly normal",
}

# A sentence that denies or describes the normal (NegEx-style triggers at the sentence start, a
# "normal" descriptor, patency) states no finding; everything else in a section is taken as one.
_NEGATED = re.compile(r"^(?:there (?:is|are) )?(?:no|not|without|negative for|free of|absence of|absent)\b")
_NEGATED_AFTER = re.compile(r"\b(?:is|are) (?:not (?:seen|identified|present|visualized)|absent)$")
_NORMAL_DESCRIPTOR = re.compile(
    r"(?<!ab)\bnormal\b|\bunremarkable\b|^patent\b|^symmetric enhancement$"
    r"|^the (?:gallbladder|appendix|spleen|pancreas|liver|bladder) is present$"
)


def states_finding(sentence: str) -> bool:
    """True when a (normalised) sentence states a finding: it is neither a denial ("No hydronephrosis.",
    "without free air", "Ascites is not seen.") nor a normal description ("The heart is normal in
    size.", "Patent portal veins."). "Surgically absent" is a finding; a post-negation needs a verb."""
    s = sentence.strip(" ,:-")
    if not s or s in NORMAL_STATEMENTS:
        return False
    if _NEGATED.match(s) or (_NEGATED_AFTER.search(s) and "surgically" not in s):
        return False
    return not _NORMAL_DESCRIPTOR.search(s)


_SENTENCE_END = re.compile(r"(?<=[.;])\s+|\n+")
_LEAD_HEADER = re.compile(r"^[a-z][a-z /&,\-]{0,40} : ")


KEEP_RULES = ("all", "findings", "bare")
_NUMBERING = re.compile(r"^[\d\s.)]*$")  # a list number left as a sentence of its own ("2.")
_LIST_TAIL = re.compile(r"^n?or\b|\bor$")  # "or free air": a list cut from its denial ("no ascites or free air")


def keep_sentences(text: str, keep: str) -> str:
    """The text a model encodes, reports and prompts alike. ``keep="all"``: the text as written
    (Merlin's); ``"findings"``: only the sentences that state a finding (a leading "Kidneys:" header is
    looked past when judging, and kept), so a report's embedding moves with what it reports rather than
    with how many findings it denies; "Normal." when none does (so a denying prompt such as "no
    hydronephrosis" encodes as "Normal."). ``"bare"``: as ``findings``, and each kept sentence loses its
    leading section header ("Kidneys: Mild hydronephrosis." -> "Mild hydronephrosis.") and list numbers
    left as sentences of their own ("IMPRESSION: 1.", "2.") are dropped, so that a report's sentences
    look like the prompts they are scored against (which carry neither); a fragment that opens or ends
    with "or" ("or free air", "hydronephrosis or": three of Merlin's denying prompts) is the tail of a
    list whose denial was cut off, and states nothing. A model package records the
    rule its text tower was trained with (``text_encoder.keep_sentences``) and the deploy side applies it
    before tokenising."""
    if keep == "all":
        return text
    if keep not in KEEP_RULES:
        raise ValueError(f"keep must be one of {', '.join(KEEP_RULES)}, got {keep!r}")
    kept = []
    for part in _SENTENCE_END.split(text):
        norm = normalize_text(part).strip(" .;")
        header = _LEAD_HEADER.match(norm)
        norm = norm[header.end() :] if header else norm
        if not norm or norm in ("findings :", "findings") or not states_finding(norm):
            continue
        part = part.strip()
        if keep == "bare":
            if _NUMBERING.match(norm) or _LIST_TAIL.search(norm):
                continue
            if header:  # the header holds no ":" of its own, so the raw text's first ":" ends it
                part = part.split(":", 1)[1].strip()
        kept.append(part)
    return " ".join(kept) if kept else "Normal."
