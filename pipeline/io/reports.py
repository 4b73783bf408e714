"""Tables for terminals and files (CSV / Parquet), written atomically."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import StridelabError
from pipeline.io.files import atomic_write_bytes, atomic_write_text


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3e}" if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4) else f"{v:.4f}"
    return str(v)


def short_steps(timesteps: str, longest: int, keep: int = 3) -> str:
    """A space-separated step list as is when it has at most `longest` entries, else its first and last
    `keep` around '...' (the teacher's 250 steps in a table): '996 992 988 ... 8 4 0'."""
    v = timesteps.split()
    return timesteps if len(v) <= longest else " ".join(v[:keep] + ["..."] + v[-keep:])


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain fixed-width table of the given columns (missing values shown as '-')."""
    cols = [c for c in columns if any(c in r for r in rows)]
    cells = [[_fmt(r.get(c, "-")) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_table(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write rows as CSV or Parquet (by extension), atomically."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([dict(r) for r in rows]), buf)
        return atomic_write_bytes(path, buf.getvalue())
    if path.suffix == ".csv":
        fields = list(dict.fromkeys(k for r in rows for k in r))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
        return atomic_write_text(path, buf.getvalue())
    raise StridelabError(f"output must end in .csv or .parquet, got {path.name!r}")


def replace_section(path: str | os.PathLike, text: str, begin: str, end: str) -> None:
    """Write `text` (a section that starts with marker `begin` and ends with `end`) into the document at `path`:
    in place of the text between those markers where both are present, else appended; atomically, so a report
    is never half rewritten. A missing document is created."""
    path = Path(path)
    doc = path.read_text() if path.exists() else ""
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin)] + text + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + "\n\n" + text + "\n"
    atomic_write_text(path, doc)
