"""A serving export's folder written under a temporary name and renamed at the end (as after/export.py does).

An existing --out is never touched, a failed export leaves nothing behind, and the partial folders of
killed exports are cleaned up by the next export to the same name.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vlmtune.after.export import PARTIAL, check_new_folder, remove_stale_partials
from vlmtune.runs import rundir


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """Yield the staging folder (created); rename it to ``out`` when the block ends without an error."""
    out = Path(out)
    check_new_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    staging = out.parent / f"{out.name}{PARTIAL}{os.getpid()}"
    staging.mkdir()
    try:
        yield staging
        check_new_folder(out)  # created meanwhile? rename would replace an empty folder
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def curves_lines(run: rundir.RunDir, folder: Path) -> list[str]:
    """Copy the run's training curves (when it drew them) into the export; the card's lines showing them."""
    source = run / rundir.CURVES
    if not source.is_file():
        return []
    shutil.copy2(source, folder / rundir.EXPORT_CURVES)
    return [
        "## Training curves",
        "",
        f"![loss, learning rate, grad norm vs step]({rundir.EXPORT_CURVES})",
        "",
    ]


def write_card_and_report(folder: Path, card: str, report: dict) -> None:
    """README.md (the model card) and vlmtune_export.json (what was checked), as every export has."""
    (folder / rundir.EXPORT_CARD).write_text(card, encoding="utf-8")
    text = json.dumps(report, indent=2, ensure_ascii=False)
    (folder / rundir.EXPORT_REPORT).write_text(text + "\n", encoding="utf-8")
