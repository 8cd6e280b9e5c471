"""Anatomy-term extraction: which anatomy regions a report mentions, read from the anatomy table.

Region ids and their report terms come from `hf_models.anatomy_rect.ANATOMY_REGIONS` (the table the anatomy masks
and the encoder's `num_regions` use too). A region is mentioned whether the finding is present or negated ("No
pleural effusion." still talks about the pleura): the region alignment loss teaches which regions a report
describes, not whether they are abnormal.
"""

from __future__ import annotations

from hf_models.anatomy_rect import ANATOMY_REGIONS, NUM_ANATOMY_REGIONS, region_term_pattern


__all__ = ["NUM_REGIONS", "REGION_TERMS", "region_mentions"]

#: Regions 1..NUM_REGIONS (background has no terms).
NUM_REGIONS = NUM_ANATOMY_REGIONS

#: Region id → the regular expression (alternation of the table's terms) that names it in a chest CT report.
REGION_TERMS: dict[int, str] = {row.id: "|".join(f"(?:{t})" for t in row.terms) for row in ANATOMY_REGIONS[1:]}
_PATTERNS = {region: region_term_pattern(region) for region in REGION_TERMS}


def region_mentions(text: str, num_regions: int = NUM_REGIONS) -> list[int]:
    """`(num_regions,)` 0/1 list: entry r is 1 when `text` names region r + 1.

    Raises:
        ValueError: when `num_regions` exceeds the regions of the anatomy table.
    """
    if not 0 <= num_regions <= NUM_REGIONS:
        raise ValueError(f"num_regions must be in 0..{NUM_REGIONS} (the anatomy table's regions), got {num_regions}")
    return [int(bool(_PATTERNS[r].search(text))) for r in range(1, num_regions + 1)]
