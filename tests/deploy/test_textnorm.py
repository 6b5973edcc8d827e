import pytest

from operators.contract.textnorm import normalize_text, wordpunct_tokens

EXAMPLES = [
    "Liver: Normal.",
    "FINDINGS: Lower thorax: Mild bibasilar atelectasis. No pleural effusion.",
    "Kidneys and ureters: 2 subcentimeter hypodensities, too small to characterize (likely cysts).",
    "IMPRESSION: 1. Small-bowel obstruction; transition point in the RLQ. 2. Status post cholecystectomy.",
    "  Aorta   measures 3.4 cm -- aneurysmal!!  ",
    "Hounsfield units ~ -20 HU; 50% height loss at T12/L1.",
]


def test_merlin_examples():
    assert normalize_text("Liver: Normal.") == "liver : normal ."
    assert normalize_text("  Multiple   renal cysts.\n") == "multiple renal cysts ."
    assert normalize_text("T12/L1, 50%") == "t12 / l1 , 50 %"
    assert normalize_text(" kidneys and ureters : normal") == "kidneys and ureters : normal"


@pytest.mark.parametrize("text", EXAMPLES)
def test_parity_with_nltk(text):
    nltk_tok = pytest.importorskip("nltk.tokenize")
    assert wordpunct_tokens(text) == nltk_tok.wordpunct_tokenize(text)
    assert normalize_text(text) == " ".join(nltk_tok.wordpunct_tokenize(text.lower()))


def test_idempotent():
    for t in EXAMPLES:
        assert normalize_text(normalize_text(t)) == normalize_text(t)
