"""Download ISIC Archive images through the official `isic-cli`, into a folder `dermsight data manifest` reads.

`isic image download` writes the images named by ISIC id plus a `metadata.csv` (diagnosis, lesion, patient, age, sex,
site); that is the `isic-archive` layout of `dermsight.data.manifest`. We only build and run its command line, so
authentication, retries and licence attributions stay with the official tool.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "isic-cli is not installed: run `pip install 'dermsight[download]'` (or `pip install isic-cli`)"


class DownloadError(RuntimeError):
    pass


@dataclass(frozen=True)
class DownloadRequest:
    out: Path
    search: str = ""  # ISIC Archive query, e.g. 'diagnosis_3:"Melanoma Invasive" AND image_type:dermoscopic'
    collections: str = ""  # comma-separated collection ids (`isic collection list` shows them)
    limit: int = 0  # 0 = everything matching


def isic_command(req: DownloadRequest, executable: str = "isic") -> list[str]:
    """The exact `isic image download` command line for a request."""
    if req.limit < 0:
        raise ValueError("limit must be 0 (no limit) or a positive number of images")
    cmd = [executable, "image", "download"]
    if req.search:
        cmd += ["--search", req.search]
    if req.collections:
        cmd += ["--collections", req.collections]
    if req.limit:
        cmd += ["--limit", str(req.limit)]
    cmd.append(str(req.out))
    return cmd


def run_download(req: DownloadRequest) -> int:
    exe = shutil.which("isic")
    if exe is None:
        raise DownloadError(INSTALL_HINT)
    req.out.mkdir(parents=True, exist_ok=True)
    return subprocess.call(isic_command(req, exe))
