"""Integrity of PyTorch files: torch's zip format keeps a CRC-32 of every record, which torch.load never checks."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

CHUNK = 1 << 22  # bytes read at a time: a ViT-H checkpoint (2.5 GB) is checked without holding it in memory


def damaged_record(path: str | Path) -> str | None:
    """The first record of a torch zip file whose bytes do not match their stored CRC-32, or None when every one
    does. A flipped bit in a tensor's data loads silently as a wrong weight; this finds it. Files of torch's legacy
    (non-zip) format carry no checksums and pass; a file that is no readable zip at all is left to torch.load."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile):
        return None
    with archive:
        for info in archive.infolist():
            try:
                with archive.open(info) as record:  # its reader compares the CRC-32 when it reaches the end
                    while record.read(CHUNK):
                        pass
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error):  # a bad CRC, header or truncated data
                return info.filename
    return None
