"""Tables as plain rows and CSV: the one place lists become text for a table cell or a CSV field."""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence

# DESIGN.md's per-matrix fields in the order tables show them; fields added later are appended after these
MATRIX_COLUMNS = ("name", "shape", "role", "tied_with", "sigma", "edge_upper", "edge_lower", "n_signal", "null_ok",
                  "null", "n_below",
                  "z_max", "energy_rank", "utilization", "stable_rank", "effective_rank", "participation_ratio",
                  "spectral_norm", "frobenius_norm", "alpha", "ave_w_phi", "ks_distance", "warnings")


def cell(value, separator: str = "; "):
    """A value fit for one table cell: lists joined with `separator`, everything else unchanged."""
    return separator.join(map(str, value)) if isinstance(value, (list, tuple)) else value


def rows_to_csv(rows: Sequence[dict]) -> str:
    """Flat dicts as CSV text (header from the first row; lists joined with ';')."""
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: cell(v, ";") for k, v in row.items()})
    return out.getvalue()


def matrix_rows(analysis) -> list[dict]:
    """One display row per analysed matrix: DESIGN.md's fields first, shape as 'rows×cols', lists as text."""
    rows = []
    for report in analysis.matrices:
        d = report.to_dict()
        d["shape"] = f"{d['shape'][0]}×{d['shape'][1]}"
        ordered = {k: cell(d.get(k)) for k in MATRIX_COLUMNS}
        ordered.update({k: cell(v) for k, v in d.items() if k not in ordered})
        rows.append(ordered)
    return rows
