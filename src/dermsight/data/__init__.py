"""The data room: dataset readers into manifests, lesion-grouped splits, the decode-once image cache."""

from dermsight.data.images import ImageError, load_rgb, probe
from dermsight.data.manifest import Ingest, build_manifest, detect_format, load_manifest, save_manifest
from dermsight.data.problems import DataError, Problem
from dermsight.data.split import SplitConfig, split_manifest

__all__ = [
    "DataError",
    "ImageError",
    "Ingest",
    "Problem",
    "SplitConfig",
    "build_manifest",
    "detect_format",
    "load_manifest",
    "load_rgb",
    "probe",
    "save_manifest",
    "split_manifest",
]
