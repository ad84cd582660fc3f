"""One-sheet .xlsx files through openpyxl (the engine of LLaVA's pandas `to_excel` upload),
byte-for-byte deterministic: fixed document dates and zip timestamps, so that writing the same
upload twice gives the same file (`answers.write_output` compares bytes)."""
from __future__ import annotations

import datetime
import io
import zipfile

from openpyxl import Workbook, load_workbook
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from openpyxl.writer.excel import ExcelWriter

SHEET = "Sheet1"  # pandas' default sheet name
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
_FIXED_DATE = datetime.datetime(1980, 1, 1)


def _value(v):
    """None/'' -> empty cell; numbers as numbers; other values as text without the control
    characters XML cannot hold (openpyxl refuses them)."""
    if v is None or v == "":
        return None
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        return v
    return ILLEGAL_CHARACTERS_RE.sub("", str(v))


def _fixed_zip_times(data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            dst.writestr(zipfile.ZipInfo(name, _FIXED_TIME), src.read(name),
                         compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


def to_bytes(header: list[str], rows: list[list]) -> bytes:
    """An .xlsx workbook with one sheet: `header` then `rows` (None/'' = empty cell)."""
    wb = Workbook()
    ws = wb.active
    ws.title = SHEET
    for row in [header] + rows:
        ws.append([_value(v) for v in row])
    wb.properties.created = wb.properties.modified = _FIXED_DATE
    raw = io.BytesIO()
    # ExcelWriter, not Workbook.save: save() stamps the current time as the modified date
    ExcelWriter(wb, zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED)).save()
    return _fixed_zip_times(raw.getvalue())


def read_rows(data: bytes) -> list[list]:
    """Rows of the first sheet (numbers as int/float, strings, None for gaps; trailing empty
    cells of each row dropped)."""
    wb = load_workbook(io.BytesIO(data), read_only=True)
    try:
        rows = []
        for row in wb.worksheets[0].iter_rows(values_only=True):
            row = list(row)
            while row and row[-1] is None:
                row.pop()
            rows.append(row)
        return rows
    finally:
        wb.close()
