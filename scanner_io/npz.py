"""Read an `.npz` file as untrusted input: every way it can be corrupt is one DataError.

A truncated or byte-flipped archive fails inside zipfile or zlib (BadZipFile, zlib.error,
EOFError, a CRC mismatch), not only with OSError/ValueError; a caller that catches the usual
two lets the rest escape as a traceback. Pickles are never loaded.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from scanner_io.errors import DataError

__all__ = ["read_npz"]

# What numpy, zipfile and zlib raise for a damaged archive or member.
_CORRUPT = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError)


def read_npz(
    path: Path, required: Iterable[str], optional: Iterable[str] = (), data: bytes | None = None
) -> dict[str, np.ndarray]:
    """Return the named arrays of the archive at `path`, or in `data` (its bytes, e.g. decrypted).

    Optional arrays are returned only when present.
    Raises DataError naming the file and what is wrong; the arrays are fully read (a member whose
    CRC fails is detected here, not on first use).
    """
    try:
        with np.load(path if data is None else io.BytesIO(data), allow_pickle=False) as z:
            missing = [name for name in required if name not in z.files]
            if missing:
                raise DataError(f"{path}: lacks array(s) {', '.join(missing)}")
            names = [*required, *(name for name in optional if name in z.files)]
            return {name: np.asarray(z[name]) for name in names}
    except DataError:
        raise
    except _CORRUPT as exc:
        raise DataError(
            f"{path} is corrupt or not an .npz archive ({type(exc).__name__}: {exc})"[:300]
        ) from None
