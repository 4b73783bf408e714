"""Where the bundled digits assets live, and how a whole asset directory is written atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DIGITS_DDPM_DIR = ASSETS_DIR / "digits" / "ddpm"
DIGITS_FEATURES_DIR = ASSETS_DIR / "digits" / "features"


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it replaces ``target`` in one rename.

    A reader sees the old directory or the complete new one. The old one is removed only after the
    swap; on any error the temporary directory is removed and ``target`` is left as it was.
    Permissions are made world-readable (``mkdtemp`` creates 0700) so installed package data works.
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        for root, dirs, files in os.walk(tmp):
            for d in dirs:
                os.chmod(Path(root) / d, 0o755)
            for f in files:
                os.chmod(Path(root) / f, 0o644)
        os.chmod(tmp, 0o755)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
