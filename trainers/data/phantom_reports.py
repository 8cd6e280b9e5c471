"""Texts of the phantom cohort: CT-RATE style reports, chain-of-thought answers, OmniAbnorm reasoning steps, and
the rule-based label extractor that reads them back. All wording of a finding comes from its row of the findings
table (`phantom_findings.FINDINGS`): positive sentences, impression, explicit negative, keyword pattern.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

from .phantom_findings import ABNORMALITIES, FINDINGS, REPORT_KEYWORDS, lobe_list


__all__ = ["CHANGE_WORDS", "NEGATION", "extract_changes", "extract_labels", "split_sentences", "write_report"]

#: Cues that make a sentence negative; every explicit negative sentence of the findings table holds one and no
#: positive template does.
NEGATION = r"\b(no|not|without|normal|resolved|absent|unremarkable)\b"

_SENTENCE_SPLIT = re.compile(r"(?<=\.)\s+")


def split_sentences(text: str) -> list[str]:
    """Report text → sentences (the generator never writes decimals or abbreviations, so '. ' splits)."""
    return [s.strip() for s in _SENTENCE_SPLIT.split(text.strip()) if s.strip()]


def extract_labels(text: str) -> dict[str, int]:
    """The 18 labels asserted by a report written with this generator's phrasing (keyword and no negation cue in
    one sentence). Exact on generated reports; a rough rule-based extractor on anything else."""
    out = {name: 0 for name in ABNORMALITIES}
    for sentence in split_sentences(text):
        low = sentence.lower()
        if re.search(NEGATION, low):
            continue
        for name, pattern in REPORT_KEYWORDS.items():
            if re.search(pattern, low):
                out[name] = 1
    return out


#: The change since the prior examination that a sentence states (`_CMP`'s wordings), by category.
CHANGE_WORDS = {
    "increased": r"\bincreased\b",
    "decreased": r"\b(decreased|regressed)\b",
    "unchanged": r"\b(unchanged|stable)\b",
    "new": r"\bnew\b",
}


def extract_changes(text: str) -> dict[str, str]:
    """Finding → change since the prior examination (`CHANGE_WORDS` category) for every sentence that asserts a
    finding (as `extract_labels` reads it) and states one change. Sentences without a change word, or with two,
    state none; a finding asserted with different changes in two sentences keeps the first."""
    out: dict[str, str] = {}
    for sentence in split_sentences(text):
        low = sentence.lower()
        if re.search(NEGATION, low):
            continue
        changes = [word for word, pattern in CHANGE_WORDS.items() if re.search(pattern, low)]
        if len(changes) != 1:
            continue
        for name, pattern in REPORT_KEYWORDS.items():
            if re.search(pattern, low):
                out.setdefault(name, changes[0])
    return out


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _pick(rng, options) -> str:
    return str(options[int(rng.integers(len(options)))])


_CMP = {
    "increased": (
        ", increased compared to the previous examination",
        ", which has increased since the previous examination",
    ),
    "decreased": (
        ", decreased compared to the previous examination",
        ", which has regressed since the previous examination",
    ),
    "unchanged": (", unchanged compared to the previous examination", ", stable compared to the previous examination"),
    "new": (", which is new compared to the previous examination", ", new since the previous examination"),
}

#: Negatives stated in one sentence when both findings are absent.
_JOINT_NEGATIVES = {
    ("Cardiomegaly", "Pericardial effusion"): (
        "Heart size is normal and no pericardial effusion was observed.",
        "Heart contour and heart size are normal; no pericardial effusion was detected.",
    ),
    ("Consolidation", "Lung opacity"): (
        "No pneumonic consolidation or ground-glass opacity was observed.",
        "No consolidation or ground-glass opacity was detected in either lung.",
    ),
}


def positive_sentences(rng, name: str, f: Mapping[str, Any], change: str | None = None) -> tuple[str, str]:
    """(findings sentence, impression sentence) asserting one abnormality, with an optional prior comparison."""
    spec = FINDINGS[name]
    cmp = "" if change is None else _pick(rng, _CMP[change])
    variant, fields = spec.words(f)
    sentence = _pick(rng, spec.positive[variant]).format(c=cmp, **fields)
    return _cap(sentence), _cap(spec.impression[variant].format(c=cmp, **fields))


def _resolved(name: str) -> str:
    noun = FINDINGS[name].resolved or name.lower()
    if name == "Medical material":
        return f"The previously noted {noun} is no longer present."
    return f"The previously described {noun} has resolved."


def write_report(rng, A, F: Mapping[str, Any], changes: Mapping[str, str], scan: SimpleNamespace) -> dict[str, Any]:
    """CT-RATE style report; returns the CSV fields plus the sentences per section (for the CoT)."""
    sec: dict[str, list[str]] = {
        "airways": [],
        "mediastinum": [],
        "lungs": [],
        "pleura": [],
        "abdomen": [],
        "bones": [],
    }
    impressions: list[str] = []
    sec["airways"].append(
        _pick(
            rng,
            (
                "Trachea and both main bronchi are in the midline and patent.",
                "Trachea and main bronchi are open, and no obstructive pathology was detected in their lumens.",
                "The trachea and both main bronchi are patent.",
            ),
        )
    )
    if scan.phase == "arterial":
        sec["mediastinum"].append("The examination was performed in the arterial phase after intravenous contrast.")
    elif scan.phase == "venous":
        sec["mediastinum"].append("Thoracic main vascular structures are opacified with contrast material.")
    else:
        sec["mediastinum"].append(
            _pick(
                rng,
                (
                    "Mediastinal structures were evaluated as suboptimal since contrast material was not given.",
                    "Examination was performed without intravenous contrast.",
                ),
            )
        )
    for name, spec in FINDINGS.items():
        if name in F:
            s, imp = positive_sentences(rng, name, F[name], changes.get(name))
            sec[spec.section].append(s)
            impressions.append(imp)
        elif changes.get(name) == "resolved":
            sec[spec.section].append(_resolved(name))
    # Explicit negatives (CT-RATE style), merged where both of a pair are negative.
    absent = {n for n in ABNORMALITIES if n not in F and changes.get(n) != "resolved"}
    stated = set()
    for pair, options in _JOINT_NEGATIVES.items():
        if set(pair) <= absent:
            sec[FINDINGS[pair[0]].section].append(_pick(rng, options))
            stated |= set(pair)
    for name, spec in FINDINGS.items():
        if name in absent and name not in stated and spec.negative and rng.random() < spec.p_negative:
            sec[spec.section].append(_pick(rng, spec.negative))
    sec["mediastinum"].append(
        _pick(
            rng,
            (
                "Calibration of the thoracic main vascular structures is natural.",
                "Thoracic aorta diameter is within normal limits.",
            ),
        )
    )
    if not any(n in F for n, s in FINDINGS.items() if s.section == "lungs"):
        sec["lungs"].insert(0, "Both lungs are well aerated.")
    if "Pleural effusion" not in absent:
        sec["pleura"].append("No pneumothorax was detected.")
    sec["abdomen"].append(
        _pick(
            rng,
            (
                "Upper abdominal organs included in the sections are unremarkable.",
                "Liver and spleen are of normal size in the sections included.",
                "The upper abdominal organs within the scan range show no significant pathology.",
            ),
        )
    )
    sec["bones"].append(
        _pick(
            rng,
            (
                "No lytic or destructive lesion was detected in the bone structures.",
                "Degenerative changes are observed in the thoracic spine."
                if A.age > 55
                else "Vertebral body heights are preserved.",
                "Bone structures in the scan range are intact.",
            ),
        )
    )
    findings = " ".join(s for part in sec.values() for s in part)
    if not impressions:
        impressions = [
            _pick(rng, ("No significant pathology was detected in the chest CT.", "Chest CT within normal limits."))
        ]
    phase = {"non-contrast": "Non-contrast", "arterial": "Arterial-phase contrast-enhanced"}.get(
        scan.phase, "Contrast-enhanced"
    )
    technique = (
        f"{phase} chest CT was performed in the axial plane with {scan.slice_label} mm slice spacing; images were "
        "evaluated in lung and mediastinal windows."
    )
    return {
        "ClinicalInformation_EN": scan.clinical,
        "Technique_EN": technique,
        "Findings_EN": findings,
        "Impressions_EN": " ".join(impressions),
        "sections": sec,
        "impressions": impressions,
    }


CLINICAL = (
    "Cough.",
    "Shortness of breath.",
    "Chest pain.",
    "Fever and cough for one week.",
    "Not given.",
    "Screening.",
    "Dyspnea on exertion.",
    "Weight loss.",
    "Preoperative evaluation.",
    "Hemoptysis.",
)
FOLLOW_UP = ("Follow-up.", "Control examination.", "Follow-up of known findings.")


def region_of(name: str, f: Mapping[str, Any]) -> str:
    """Where a finding lies, in words (its lobes, its pleural space, or the table's region words)."""
    if name == "Pleural effusion":
        sides = sorted(f["t"])
        return "both pleural spaces" if len(sides) == 2 else f"{sides[0]} pleural space"
    if name == "Lung nodule":
        return lobe_list([n["lobe"] for n in f["nodules"]])
    if name == "Lung opacity":
        return lobe_list([b["lobe"] for b in f["blobs"]])
    if FINDINGS[name].where is None:
        return lobe_list([f["lobe"]])
    return FINDINGS[name].where


def cot_entry(rng, volname: str, F: Mapping[str, Any], report: Mapping[str, Any]) -> dict[str, str]:
    """A chain-of-thought record: a systematic read of the whole report, or a yes/no question about one finding."""
    sec = report["sections"]
    if rng.random() < 0.7:
        question = _pick(
            rng,
            (
                "What are the abnormal findings in this chest CT? Think step by step.",
                "Describe the findings of this chest CT scan, reasoning through each anatomical region.",
                "Analyse this chest CT systematically and give your impression.",
            ),
        )
        steps = [
            ("Airways", sec["airways"]),
            ("Mediastinum and heart", sec["mediastinum"]),
            ("Lungs", sec["lungs"]),
            ("Pleura", sec["pleura"]),
            ("Upper abdomen and bones", sec["abdomen"] + sec["bones"]),
        ]
        answer = " ".join(f"Step {i + 1} ({title}): {' '.join(s)}" for i, (title, s) in enumerate(steps))
        answer += " Conclusion: " + " ".join(report["impressions"])
    else:
        name = _pick(rng, ABNORMALITIES)
        spec = FINDINGS[name]
        question = f"Is there {name.lower()} in this chest CT? Explain your reasoning step by step."
        steps = [f"Step 1: Identify the relevant anatomy ({spec.where or 'lung parenchyma'})."]
        steps.append(f"Step 2: Look for the characteristic appearance: {spec.appearance}.")
        if name in F:
            s, _ = positive_sentences(rng, name, F[name])
            steps += [f"Step 3: {s}", "Answer: Yes."]
        else:
            steps += [f"Step 3: No such appearance is present, so there is no {name.lower()}.", "Answer: No."]
        answer = " ".join(steps)
    return {"volumename": volname, "question": question, "answer": answer}


def omni_cot(name: str, region: str, area_mm2: float) -> list[str]:
    """OmniAbnorm-style reasoning steps for one 2D case."""
    return [
        f"Locate the region: the abnormality lies in the {region}.",
        f"Describe the appearance: {FINDINGS[name].appearance}.",
        f"Estimate the extent: the lesion covers about {int(round(area_mm2))} square millimetres on this axial slice.",
        f"Compare with normal anatomy: the {region} normally shows no such density.",
        f"Conclusion: the findings are consistent with {name.lower()}.",
    ]
