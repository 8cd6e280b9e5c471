"""The anatomy regions of a chest CT, in one table: id, name, typical Hounsfield units and report terms.

Anatomy masks (`anatomy_mask`, uint8) hold one region id per voxel: 0 is background and 1..`NUM_ANATOMY_REGIONS`
are the regions whose learned queries the vision encoder's region-aware attention uses
(`ReCTVisionConfig.num_regions`). Everything that needs region ids reads them here: the phantom cohort generator
(which region a voxel belongs to, its name and tissue), the anatomy-term extractor (which regions a report sentence
names, for the region alignment loss) and the model configuration (how many regions there are).

`hu_range` is the typical range of the region's defining tissue in Hounsfield units over non-contrast, arterial and
venous phase scans (e.g. the heart: 20 HU unenhanced blood up to about 450 HU in the arterial phase); thin or
mixed regions (ribs, pleura, trachea with its wall) are dominated by partial volume at coarse voxels, so compare
their medians only on fine grids. `terms` are case-insensitive regular expressions; a sentence names a region when
any of them matches, whether the sentence asserts or negates a finding ("No pleural effusion." names the pleura).

This file is Hub code: standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


__all__ = [
    "ANATOMY_REGIONS",
    "NUM_ANATOMY_REGIONS",
    "AnatomyRegion",
    "anatomy_region",
    "region_term_pattern",
]


@dataclass(frozen=True)
class AnatomyRegion:
    """One row of the anatomy table.

    Attributes:
        id: value of the region's voxels in an anatomy mask (0 = background).
        name: short name, as a report would say it ("right upper lobe").
        description: what the region includes.
        hu_range: `(low, high)` typical HU of the region's defining tissue (see the module docstring).
        terms: regular expressions of the report words that name the region (case-insensitive).
    """

    id: int
    name: str
    description: str
    hu_range: tuple[float, float]
    terms: tuple[str, ...]


def _lobe_terms(side: str, part: str) -> tuple[str, ...]:
    """'right lower lobe', 'right upper and lower lobes', 'right upper, middle and lower lobes' all name the right
    lower lobe; so do 'both lower lobes' and 'the lower lobes'."""
    parts = "(?:upper|middle|lower)"
    listed = rf"\b{side} (?=(?:{parts}(?:, | and ))*{part}\b){parts}(?:(?:, | and ){parts})* lobes?\b"
    terms = [listed, rf"\b(?:both|the|bilateral) {part} lobes\b"]
    if part != "middle":
        zone = "apex|apical" if part == "upper" else "base|basal"
        terms.append(rf"\b{side} (?:lung )?(?:{zone})\b")
    if part == "upper":
        terms.append(r"\bupper zones?\b")
    if part == "middle":
        terms.append(r"\bmiddle lobe\b")
    terms.append(r"\bboth lungs\b")
    return tuple(terms)


#: The anatomy table: row `i` has id `i`.
ANATOMY_REGIONS: tuple[AnatomyRegion, ...] = (
    AnatomyRegion(0, "background", "air outside the body, CT table", (-1024, -900), ()),
    AnatomyRegion(
        1,
        "body wall",
        "skin, subcutaneous fat, muscle, breasts, diaphragm, neck",
        (-160, 80),
        (r"chest wall", r"body wall", r"soft tissue", r"subcutaneous", r"breast", r"axill", r"diaphragm", r"pectoral"),
    ),
    AnatomyRegion(2, "right upper lobe", "right upper lobe of the lung", (-930, -700), _lobe_terms("right", "upper")),
    AnatomyRegion(
        3, "right middle lobe", "right middle lobe of the lung", (-930, -700), _lobe_terms("right", "middle")
    ),
    AnatomyRegion(4, "right lower lobe", "right lower lobe of the lung", (-930, -700), _lobe_terms("right", "lower")),
    AnatomyRegion(
        5,
        "left upper lobe",
        "left upper lobe of the lung, lingula",
        (-930, -700),
        (*_lobe_terms("left", "upper"), "lingula"),
    ),
    AnatomyRegion(6, "left lower lobe", "left lower lobe of the lung", (-930, -700), _lobe_terms("left", "lower")),
    AnatomyRegion(
        7,
        "heart",
        "heart and pericardial sac (myocardium, blood pool, pericardial fluid)",
        (20, 450),
        (r"heart", r"cardiac", r"cardiomegaly", r"cardiothoracic", r"pericardi", r"coronar"),
    ),
    AnatomyRegion(8, "aorta", "aorta and arch branches", (25, 500), (r"aort", r"\barch\b")),
    AnatomyRegion(
        9,
        "pulmonary artery",
        "pulmonary trunk and main pulmonary arteries",
        (25, 500),
        (r"pulmonary arter", r"pulmonary trunk"),
    ),
    AnatomyRegion(
        10,
        "trachea",
        "trachea and main bronchi (lumen and wall)",
        (-1024, -500),
        (r"trachea", r"main bronch", r"carina"),
    ),
    AnatomyRegion(11, "oesophagus", "oesophagus (wall, lumen)", (-100, 80), (r"oesophag", r"esophag")),
    AnatomyRegion(
        12,
        "thoracic spine",
        "vertebrae, discs, spinal canal",
        (150, 1000),
        (r"vertebra", r"\bspine\b", r"spinal"),
    ),
    AnatomyRegion(13, "ribs", "ribs and costal cartilage", (100, 1000), (r"\bribs?\b", r"costal")),
    AnatomyRegion(14, "sternum", "sternum", (100, 1000), (r"stern",)),
    AnatomyRegion(15, "liver", "liver", (40, 170), (r"liver", r"hepatic")),
    AnatomyRegion(
        16,
        "stomach",
        "stomach including a hiatal hernia (wall, fluid, air)",
        (-1000, 80),
        (r"stomach", r"hiatal", r"hiatus", r"gastric"),
    ),
    AnatomyRegion(17, "spleen", "spleen", (35, 180), (r"spleen", r"splenic")),
    AnatomyRegion(
        18,
        "mediastinum",
        "mediastinal fat, lymph nodes, superior vena cava, pericardial fat",
        (-160, 60),
        (
            r"mediastin",
            r"lymph node",
            r"lymphadenopathy",
            r"\bhil(?:ar|um)\b",
            r"paratracheal",
            r"subcarinal",
            r"prevascular",
            r"aortopulmonary",
        ),
    ),
    AnatomyRegion(
        19,
        "pleura",
        "pleural space (pleura, pleural effusion; a thin rim whose voxels share the adjacent lung)",
        (-250, 40),
        (r"pleura", r"hemithora", r"pneumothorax"),
    ),
    AnatomyRegion(
        20,
        "upper abdomen",
        "other upper abdomen (abdominal fat, bowel, kidneys)",
        (-160, 200),
        (r"upper abdom", r"abdominal", r"kidney", r"renal", r"adrenal", r"bowel"),
    ),
)

#: Regions with learned queries in the encoder: ids 1..NUM_ANATOMY_REGIONS (0, the background, has none).
NUM_ANATOMY_REGIONS: int = len(ANATOMY_REGIONS) - 1

_BY_NAME = {row.name: row for row in ANATOMY_REGIONS}


def anatomy_region(key: int | str) -> AnatomyRegion:
    """The table row of a region id or name.

    Raises:
        KeyError: naming the key and the valid ids/names when the region does not exist.
    """
    if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(ANATOMY_REGIONS):
        return ANATOMY_REGIONS[key]
    if isinstance(key, str) and key in _BY_NAME:
        return _BY_NAME[key]
    raise KeyError(f"no anatomy region {key!r}: expected an id 0..{NUM_ANATOMY_REGIONS} or one of {sorted(_BY_NAME)}")


def region_term_pattern(key: int | str) -> re.Pattern[str]:
    """Compiled case-insensitive pattern matching any report term of a region (never matches for background)."""
    terms = anatomy_region(key).terms
    return re.compile("|".join(f"(?:{t})" for t in terms) if terms else r"(?!)", re.IGNORECASE)
