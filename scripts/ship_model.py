"""Make a model file ready to serve without PyTorch: record its start-up self-test answers (if it has none) and write
its ONNX export beside it (``default.safetensors`` -> ``default.onnx``), which carries the model's contract.

    .venv/bin/python scripts/ship_model.py src/dermsight/assets/default.safetensors

`Predictor` serves the export beside a model file when that export was made from the very same file (same tensor
checksum and contract, `inference.predictor.shipped_export`); a serving install (no PyTorch) can only serve such a
pair or an ``.onnx`` export. Run this again after anything rewrites the model file (calibration, recorded figures):
the test suite fails while the bundled pair disagrees.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from dermsight.inference.backends import TorchRunner
from dermsight.inference.export import PARITY_TOLERANCE, export_model
from dermsight.inference.selftest import probe_record
from dermsight.models.bundle import ModelLoadError, load_model, update_meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="a .safetensors model file")
    args = ap.parse_args(argv)
    try:
        model, meta = load_model(args.model)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not meta.probe:
        update_meta(args.model, replace(meta, probe=probe_record(TorchRunner(model), meta)))
        print(f"recorded the self-test answers in {args.model}")
    report, meta = export_model(args.model, args.model.with_suffix(".onnx"))
    print("\n".join(report.lines(meta)))
    return 0 if report.parity.max_abs_diff <= PARITY_TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
