import pytest

from operators.contract.findings import SECTIONS
from training.reports import ReportError, is_normal_section, parse_report, section_status, states_finding

MERLIN_STYLE = (
    "FINDINGS: Lower thorax: Mild bibasilar atelectasis. No pleural effusion. "
    "Liver and biliary tree: Diffuse hepatic steatosis. No biliary ductal dilation. "
    "Gallbladder: Surgically absent. Spleen: Normal. Pancreas: Unremarkable. Adrenal glands: Within normal limits. "
    "Kidneys and ureters: 2 subcentimeter hypodensities in the left kidney. No hydronephrosis. "
    "Gastrointestinal tract: Normal. Peritoneal space: No free air or ascites. "
    "Bladder: Unremarkable. Prostate and seminal vesicles: Mild prostatomegaly. "
    "Vasculature: Mild atherosclerosis. Lymph nodes: No lymphadenopathy. Musculoskeletal: Degenerative changes. "
    "IMPRESSION: 1. Hepatic steatosis. 2. Bibasilar atelectasis."
)


def test_thirteen_sections_and_impression():
    r = parse_report(MERLIN_STYLE)
    assert set(r.sections) == set(SECTIONS) and len(SECTIONS) == 13  # Merlin's 13 organ systems
    assert r.sections["liver"] == "Diffuse hepatic steatosis. No biliary ductal dilation."
    # Two headers feed the pelvic system.
    assert r.sections["pelvic"] == "Unremarkable. Mild prostatomegaly."
    assert r.impression == "1. Hepatic steatosis. 2. Bibasilar atelectasis."
    assert "IMPRESSION" not in r.findings and "steatosis" in r.findings
    assert not r.unknown_headers


def test_other_spellings_newlines_and_missing_sections():
    text = (
        "EXAM: CT abdomen and pelvis with contrast.\nFINDINGS:\nLUNG BASES: Clear.\nLIVER: Normal.\n"
        "GI tract: Normal caliber bowel loops. Appendix: Normal.\nGU: Left renal cyst.\n"
        "Bones/soft tissues: No acute fracture.\nIMPRESSION:\n1. Left renal cyst."
    )
    r = parse_report(text)
    assert r.sections == {
        "lower thorax": "Clear.",
        "liver": "Normal.",
        "bowel": "Normal caliber bowel loops.",
        "kidneys": "Left renal cyst.",
        "musculoskeletal": "No acute fracture.",
    }
    # "Appendix:" is not a system header: it ends the bowel section without starting one.
    assert r.unknown_headers == ["Appendix"]
    assert "spleen" not in r.sections  # missing sections are simply absent


def test_no_impression_and_headers_without_space():
    r = parse_report("Findings:Spleen:Enlarged.Kidneys:Normal.")
    assert r.sections == {"spleen": "Enlarged.", "kidneys": "Normal."}
    assert r.impression == ""


def test_report_without_findings_is_refused():
    with pytest.raises(ReportError, match="no 'FINDINGS:' section"):
        parse_report("IMPRESSION: 1. No acute abnormality.", source="reports.csv: study X")
    with pytest.raises(ReportError, match="empty report"):
        parse_report("   ")


@pytest.mark.parametrize(
    "body,stock,finding",
    [
        ("Normal.", True, True),
        ("Unremarkable.", True, True),
        ("Within normal limits.", True, True),
        ("normal", True, True),
        ("Normal. Unremarkable.", True, True),
        ("No acute abnormality.", True, True),
        ("No hydronephrosis.", False, True),
        ("No hydronephrosis. No renal cysts.", False, True),
        ("Normal. Small cyst.", False, False),
        ("Mild splenomegaly.", False, False),
        ("Normal in size.", False, True),
        ("", False, False),
    ],
)
def test_normal_section_rules(body, stock, finding):
    assert is_normal_section(body, "stock") is stock
    assert is_normal_section(body) is finding


def test_section_status():
    st = section_status(parse_report(MERLIN_STYLE))
    assert st["spleen"] == "normal" and st["pancreas"] == "normal" and st["adrenal glands"] == "normal"
    assert st["liver"] == "abnormal" and st["pelvic"] == "abnormal"


@pytest.mark.parametrize(
    "sentence,finding",
    [
        ("no hydronephrosis", False),
        ("no evidence of venous thrombosis", False),
        ("without free air", False),
        ("ascites is not seen", False),
        ("the heart is normal in size", False),
        ("normal caliber bowel loops", False),
        ("patent portal and hepatic veins", False),
        ("the gallbladder is present", False),
        ("within normal limits", False),
        ("mild right hydronephrosis", True),
        ("the gallbladder is surgically absent", True),
        ("gallstones present without evidence of cholecystitis", True),
        ("abnormal enhancement of the liver", True),
        ("degenerative changes of the lumbar spine", True),
        ("there is a small sliding hiatal hernia", True),
        ("there is no intra - peritoneal free air", False),
    ],
)
def test_states_finding_understands_negation(sentence, finding):
    assert states_finding(sentence) is finding


def test_finding_rule_agrees_with_the_corpus_labels(corpus200):
    """On the generated corpus's phrasings: a section holding a labelled finding of its organ system
    is abnormal under the finding rule whenever its text reports one; a section that only denies is
    normal (the stock rule called most of those abnormal)."""
    from operators.contract.findings import load_catalogue
    from training.data import read_merlin_release

    cols: dict = {}
    for j, f in enumerate(load_catalogue()):
        cols.setdefault(f.section, []).append(j)
    agree = total = denials_stock_abnormal = 0
    for st in read_merlin_release(corpus200):
        for sec, body in st.sections.items():
            labelled = any(st.labels[j] == 1 for j in cols.get(sec, []))
            total += 1
            agree += labelled == (not is_normal_section(body))
            if not labelled and not is_normal_section(body, "stock") and is_normal_section(body):
                denials_stock_abnormal += 1
    assert agree / total > 0.95, agree / total
    assert denials_stock_abnormal > 0.2 * total


def test_keep_sentences_findings_drops_denials_and_normal_descriptions():
    from training.reports import keep_sentences

    text = (
        "Lower chest: Normal in appearance. Liver: No hepatomegaly. Mild hepatic steatosis. "
        "GU: Unremarkable. Kidneys: Mild right hydronephrosis. The gallbladder is surgically absent."
    )
    assert keep_sentences(text, "all") == text
    assert keep_sentences(text, "findings") == (
        "Mild hepatic steatosis. Kidneys: Mild right hydronephrosis. The gallbladder is surgically absent."
    )
    assert keep_sentences("No hydronephrosis. No renal cysts.", "findings") == "Normal."
    with pytest.raises(ValueError, match="keep must be"):
        keep_sentences(text, "some")


def test_keep_sentences_bare_leaves_sentences_shaped_like_prompts():
    """``bare``: the findings rule, then no section headers, no list numbers and no list tails."""
    from training.reports import keep_sentences

    report = (
        "LOWER THORAX: Aortic valve calcification. No atelectasis. Kidneys: Mild right hydronephrosis. "
        "IMPRESSION: 1. Mild right hydronephrosis. 2. Aortic valve calcification."
    )
    assert keep_sentences(report, "bare") == (
        "Aortic valve calcification. Mild right hydronephrosis. Mild right hydronephrosis. Aortic valve calcification."
    )
    assert keep_sentences(report, "findings").startswith("LOWER THORAX: Aortic valve calcification. Kidneys:")
    assert keep_sentences("pancreas : severe atrophy", "bare") == "severe atrophy"
    for denial in ("or free air", "hydronephrosis or", "no hydronephrosis", "kidneys : normal"):
        assert keep_sentences(denial, "bare") == "Normal.", denial
    assert keep_sentences("or free air", "findings") == "or free air"  # the committed runs' rule is unchanged
    once = keep_sentences(report, "bare")
    assert keep_sentences(once, "bare") == once  # a fixed point, as the planner's texts must be


def test_planner_trains_on_the_kept_sentences(corpus200):
    from training.config import TrainConfig
    from training.data import read_merlin_release
    from training.reports import keep_sentences
    from training.sampling import FULL, BatchPlanner, Item

    studies = [s for s in read_merlin_release(corpus200) if s.split == "train"]
    cfg = TrainConfig.load("cpu-tiny", ["train.batch_size=8", "text.keep_sentences=findings"])
    p = BatchPlanner(studies, cfg)
    texts = [p.text_of(Item(i, FULL)) for i in range(len(studies))]
    assert "Normal." in texts and not any(" no " in f" {t.lower()}" for t in texts)
    sec = p.sections[0]
    i = int(p.normal[sec][0])
    assert p.text_of(Item(i, sec)) == "Normal."  # a section that states no finding, as a normal report
    bare = BatchPlanner(studies, TrainConfig.load("cpu-tiny", ["train.batch_size=8", "text.keep_sentences=bare"]))
    j = int(p.abnormal[sec][0])
    assert p.text_of(Item(j, sec)).startswith(f"{sec}: ")
    text = bare.text_of(Item(j, sec))  # no "<section>: " prefix, and the tower's rule leaves it as it is
    assert text == keep_sentences(studies[j].sections[sec], "bare") != "Normal."
    assert keep_sentences(text, "bare") == text
