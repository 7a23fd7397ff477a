"""Seeded groups: keys, creation times and properties of group ``j`` of type ``t``, and closed-form
property counts.

Group ``j`` is created about ``j`` minutes before the seed epoch (``created_at`` strictly falls
with ``j``), so "newest first" is increasing ``j`` and a cursor position maps back to an index in
O(1). Properties follow modular patterns in ``j`` so each value's count is a formula, not a scan.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .hashing import mix
from .seed import EPOCH, GROUP_TYPE_NAMES, Project, iso_z

#: Seeded groups are spaced by this many seconds (plus a jitter smaller than it).
GROUP_STEP_S = 60

_ADJECTIVES = ("Bright", "Quiet", "Rapid", "Golden", "Northern", "Clever", "Silver", "Blue")
_NOUNS = ("Labs", "Works", "Systems", "Foods", "Logistics", "Health", "Studio", "Capital", "Tech")
_PLANS_BY_RESIDUE = ("free",) * 5 + ("paid",) * 3 + ("enterprise",) * 2  # residue of 3j+s mod 10
_INDUSTRIES = ("software", "retail", "finance", "healthcare", "education", "media", "logistics")
_EMPLOYEES = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000, 10000)
_BETA_MODULUS = 13


def _residue_count(n: int, modulus: int, residue: int) -> int:
    """How many ``j`` in ``[0, n)`` have ``j % modulus == residue``."""
    return 0 if residue >= n else (n - 1 - residue) // modulus + 1


@dataclass(frozen=True)
class GroupPattern:
    """Per (project, type) offsets of the modular property patterns."""

    plan: int
    industry: int
    employees: int
    beta: int
    name_a: int
    name_b: int


def group_type_json(project: Project, index: int) -> dict[str, Any]:
    name = GROUP_TYPE_NAMES[index]
    return {
        "group_type": name,
        "group_type_index": index,
        "name_singular": name,
        "name_plural": f"{name}s",
        "detail_dashboard": None,
        "default_columns": None,
        "created_at": iso_z(EPOCH - timedelta(days=500 - index)),
    }


def group_pattern(project: Project, type_index: int) -> GroupPattern:
    h = [mix(project.seed, project.id, 21, type_index, k) for k in range(6)]
    return GroupPattern(h[0] % 10, h[1] % 7, h[2] % 11, h[3] % _BETA_MODULUS, h[4], h[5])


def group_key(type_index: int, j: int) -> str:
    return f"{GROUP_TYPE_NAMES[type_index]}-{j}"


def group_index(project: Project, type_index: int, key: str) -> int | None:
    """Inverse of :func:`group_key`, or ``None`` for keys the seed never made."""
    prefix = f"{GROUP_TYPE_NAMES[type_index]}-" if 0 <= type_index < project.n_group_types else None
    if prefix is None or not key.startswith(prefix):
        return None
    digits = key[len(prefix) :]
    if not digits.isdigit() or str(int(digits)) != digits:
        return None
    j = int(digits)
    return j if j < project.n_groups else None


def group_created_offset_s(project: Project, type_index: int, j: int) -> int:
    """Seconds before :data:`EPOCH`; strictly increasing in ``j``, so ``created_at`` falls."""
    return GROUP_STEP_S * j + mix(project.seed, project.id, 31, type_index, j) % GROUP_STEP_S


def group_created_at(project: Project, type_index: int, j: int) -> datetime:
    return EPOCH - timedelta(seconds=group_created_offset_s(project, type_index, j))


def first_index_older_than(project: Project, type_index: int, moment: datetime) -> int:
    """Smallest ``j`` whose ``created_at`` is strictly before ``moment`` (cursor pagination)."""
    x = (EPOCH - moment).total_seconds()
    if x < 0:
        return 0
    j0 = int(x // GROUP_STEP_S)
    return j0 if group_created_offset_s(project, type_index, j0) > x else j0 + 1


def group_properties(project: Project, type_index: int, j: int) -> dict[str, Any]:
    p = group_pattern(project, type_index)
    props: dict[str, Any] = {
        "name": f"{_ADJECTIVES[(j + p.name_a) % len(_ADJECTIVES)]} "
        f"{_NOUNS[(j * 5 + p.name_b) % len(_NOUNS)]} {j}",
        "plan": _PLANS_BY_RESIDUE[(3 * j + p.plan) % 10],
        "industry": _INDUSTRIES[(j + p.industry) % len(_INDUSTRIES)],
        "employees": _EMPLOYEES[(j + p.employees) % len(_EMPLOYEES)],
    }
    if (j + p.beta) % _BETA_MODULUS == 0:
        props["beta_tester"] = True
    return props


def group_json(project: Project, type_index: int, j: int) -> dict[str, Any]:
    return {
        "group_type_index": type_index,
        "group_key": group_key(type_index, j),
        "group_properties": group_properties(project, type_index, j),
        "created_at": iso_z(group_created_at(project, type_index, j)),
    }


def property_value_text(value: Any) -> str:
    """How ClickHouse's ``JSONExtractRaw`` + quote trim shows a property value."""
    return value if isinstance(value, str) else json.dumps(value)


#: Properties whose per-value counts have closed forms; ``name`` is unique per group.
COUNTABLE_PROPERTIES = ("plan", "industry", "employees", "beta_tester")


def property_value_counts(project: Project, type_index: int, key: str) -> dict[str, int]:
    """Seeded count of each value of ``key`` among all groups of a type, by formula."""
    n = project.n_groups
    p = group_pattern(project, type_index)
    counts: dict[str, int] = {}
    if key == "plan":
        for residue, plan in enumerate(_PLANS_BY_RESIDUE):
            # 3j + off ≡ residue (mod 10)  <=>  j ≡ 7 (residue - off) (mod 10); 7 = 3⁻¹ mod 10
            c = _residue_count(n, 10, (7 * (residue - p.plan)) % 10)
            counts[plan] = counts.get(plan, 0) + c
    elif key in ("industry", "employees"):
        values = _INDUSTRIES if key == "industry" else _EMPLOYEES
        offset = p.industry if key == "industry" else p.employees
        for k, value in enumerate(values):
            counts[property_value_text(value)] = _residue_count(
                n, len(values), (k - offset) % len(values)
            )
    elif key == "beta_tester":
        counts["true"] = _residue_count(n, _BETA_MODULUS, (-p.beta) % _BETA_MODULUS)
    return {value: c for value, c in counts.items() if c > 0}
