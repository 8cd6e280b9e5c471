"""Anatomy-term extraction: which of the 20 anatomy regions a report sentence mentions.

Region ids follow the anatomy masks (1..20; see `trainers.data.phantom.ANATOMY_REGIONS`). A region is mentioned
whether the finding is present or negated ("No pleural effusion." still talks about the pleura): the region
alignment loss teaches which regions a report describes, not whether they are abnormal.
"""

from __future__ import annotations

import re


NUM_REGIONS = 20

#: Region id → regular expression of the terms that name it in a chest CT report.
REGION_TERMS: dict[int, str] = {
    1: r"chest wall|soft tissue|subcutaneous|breast|axilla|diaphragm",
    2: r"right upper lobe|right lung apex|right apical",
    3: r"(right )?middle lobe",
    4: r"right lower lobe|right (lung )?base",
    5: r"left upper lobe|lingula|left lung apex|left apical",
    6: r"left lower lobe|left (lung )?base",
    7: r"heart|cardiac|cardiomegaly|pericardi|coronary",
    8: r"aort|arch",
    9: r"pulmonary arter|pulmonary trunk",
    10: r"trachea|main bronch|carina",
    11: r"oesophag|esophag",
    12: r"vertebra|spine|spinal|thoracic spine",
    13: r"\bribs?\b|costal",
    14: r"stern",
    15: r"liver|hepatic",
    16: r"stomach|hiatal|hiatus|gastric",
    17: r"spleen|splenic",
    18: r"mediastin|lymph node|lymphadenopathy|hilar|hilum",
    19: r"pleura",
    20: r"upper abdom|abdominal|kidney|renal|adrenal|bowel",
}
_PATTERNS = {region: re.compile(pattern, re.IGNORECASE) for region, pattern in REGION_TERMS.items()}


def region_mentions(text: str, num_regions: int = NUM_REGIONS) -> list[int]:
    """`(num_regions,)` 0/1 list: entry r is 1 when `text` names region r + 1."""
    if num_regions > NUM_REGIONS:
        raise ValueError(f"the term table covers {NUM_REGIONS} regions, asked for {num_regions}")
    return [int(bool(_PATTERNS[r].search(text))) for r in range(1, num_regions + 1)]
