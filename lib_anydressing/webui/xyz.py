"""X/Y/Z plot axes for AnyDressing's strength and garment weights.

xyz_grid runs each cell on a shallow copy of `p`; the axis puts its value in `p.anydressing_xyz`,
which `process` applies over the UI's values.
"""

from __future__ import annotations

from typing import Any

ATTRIBUTE = "anydressing_xyz"


def _setter(key: str):
    def apply(p: Any, value: Any, values: Any) -> None:
        setattr(p, ATTRIBUTE, {**getattr(p, ATTRIBUTE, {}), key: float(value)})

    return apply


def overrides(p: Any) -> dict[str, float]:
    return dict(getattr(p, ATTRIBUTE, {}))


def add_axes(xyz_grid: Any, n_slots: int) -> None:
    """Append the axes to xyz_grid.axis_options (once), as A1111's own Hypertile extension does."""
    if any(getattr(o, "label", "").startswith("[AnyDressing]") for o in xyz_grid.axis_options):
        return
    xyz_grid.axis_options.append(xyz_grid.AxisOption("[AnyDressing] Strength", float, _setter("strength")))
    for i in range(1, n_slots + 1):
        xyz_grid.axis_options.append(xyz_grid.AxisOption(f"[AnyDressing] Weight {i}", float, _setter(f"weight {i}")))
