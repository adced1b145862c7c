"""Serving without PyTorch: the bundled model's ONNX export carries its contract, the heatmap comes from the graph,
and `pip install .` brings only what serving needs.

- In a child process where PyTorch and the other training libraries cannot be imported, the predictor, the CLI and
  the web app answer with the bundled model, its self-test and its heatmap.
- The graph's class activation map, scaled as the grad-cam package scales Grad-CAM, is the package's Grad-CAM map
  on the PyTorch network.
- The export shipped beside the bundled model is made from that very file, and serves its answers.
- A stale export beside a model is not served; an ``.onnx`` export serves on its own.
- (slow) `pip install .` into a new virtual environment: no PyTorch, at most `INSTALL_LIMIT_MB`, and `dermsight
  predict` answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_inference import tiny_model

from conftest import ROOT
from dermsight.inference.explain import cam_heat, gradcam
from dermsight.inference.export import export_model
from dermsight.inference.predictor import Predictor, shipped_export
from dermsight.inference.preprocess import model_inputs, synthetic_images
from dermsight.inference.runtime import OnnxRunner, read_contract
from dermsight.models.bundle import DEFAULT_MODEL, load_model, read_meta, update_meta

# What a serving install lacks: the training stack, and what only export needs.
TRAINING_ONLY = ("torch", "torchvision", "timm", "sklearn", "scipy", "pytorch_grad_cam", "matplotlib", "onnx", "cv2")
DEFAULT_EXPORT = DEFAULT_MODEL.with_suffix(".onnx")
# The serving install's size bar (the issue's).
INSTALL_LIMIT_MB = 600

CHILD = textwrap.dedent(
    """
    import io, json, re, sys
    for name in {blocked!r}:
        sys.modules[name] = None  # `import torch` (or torch.nn...) now raises ImportError
    import numpy as np
    from PIL import Image
    from dermsight.inference.predictor import Predictor, torch_installed
    from dermsight.inference.preprocess import synthetic_images
    from dermsight.web.app import create_app

    out = {{"torch_installed": torch_installed()}}
    lesion = synthetic_images(1, size=(600, 450), seed=3)[0]
    buf = io.BytesIO()
    Image.fromarray(lesion).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    open(sys.argv[1], "wb").write(jpeg)

    p = Predictor.from_path()
    out["backend"], out["cam"], out["self_test"] = p.backend, p.cam, p.self_test()["checked"]
    r = p.predict(jpeg)
    out["status"] = r.status
    out["probabilities"] = {{c.code: c.probability for c in r.predictions}}
    out["heatmap_png"] = p.explain(jpeg)[:8] == b"\\x89PNG\\r\\n\\x1a\\n"

    from dermsight.cli import main
    out["cli_exit"] = main(["predict", "--json", sys.argv[1]])

    app = create_app(config={{"RATE_LIMIT": "off", "SECRET_KEY": "t", "LOAD_MODEL_AT_START": True}})
    client = app.test_client()
    for _ in range(600):
        health = client.get("/healthz")
        if health.status_code != 503 or health.get_json().get("status") == "failed":
            break
        import time; time.sleep(0.1)
    out["healthz"] = health.status_code
    api = client.post("/api/v1/predict", data={{"image": (io.BytesIO(jpeg), "x.jpg")}})
    out["api"] = [api.status_code, api.get_json()["status"]]
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/").get_data(as_text=True)).group(1)
    page = client.post("/analyse", data={{"image": (io.BytesIO(jpeg), "x.jpg"), "csrf_token": token}})
    out["page"] = [page.status_code, 'id="heatmap"' in page.get_data(as_text=True)]
    out["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r} and sys.modules[m] is not None)
    print("RESULT " + json.dumps(out))
    """
)


def test_the_bundled_model_serves_without_pytorch(tmp_path):
    script = CHILD.format(blocked=TRAINING_ONLY)
    # The bundled default, found as a user's install finds it.
    env = {**{k: v for k, v in os.environ.items() if k != "DERMSIGHT_MODEL"}, "DERMSIGHT_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "lesion.jpg")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    assert out["torch_installed"] is False and out["imported"] == []
    assert out["backend"] == "onnx" and out["cam"] is True
    assert out["self_test"] == "finite outputs and recorded answers"
    assert out["status"] in ("ok", "rejected") and out["heatmap_png"] and out["cli_exit"] == 0
    assert out["healthz"] == 200 and out["api"] == [200, out["status"]] and out["page"][0] == 200
    # The same answer as the full install gives for the same photo.
    full = Predictor.from_path(DEFAULT_MODEL, backend="torch", threads=1).predict(
        (tmp_path / "lesion.jpg").read_bytes()
    )
    assert full.status == out["status"]
    if full.status == "ok":
        assert out["page"][1]
        for c in full.predictions:
            assert abs(out["probabilities"][c.code] - c.probability) < 1e-4


def test_the_shipped_export_is_made_from_the_bundled_model_file():
    # `make ship-model` writes it; a model file rewritten without it (new figures, a recalibration) fails here.
    shipped = shipped_export(DEFAULT_MODEL)
    assert shipped is not None, "src/dermsight/assets/default.onnx is missing or stale: run `make ship-model`"
    contract = shipped[1]
    assert contract.meta == read_meta(DEFAULT_MODEL) and contract.cam and contract.meta.probe
    p = Predictor.from_path(DEFAULT_MODEL, threads=1)
    assert p.backend == "onnx" and p._runner.path == DEFAULT_EXPORT and p.cam


@pytest.mark.slow
def test_the_graphs_activation_map_is_grad_cam():
    model, meta = load_model(DEFAULT_MODEL)
    x = model_inputs(meta, synthetic_images(3, size=(300, 225), seed=5))
    runner = OnnxRunner(DEFAULT_EXPORT, 1)
    logits, cams = runner.cam(x)
    size = (x.shape[-1], x.shape[-2])
    for i in range(len(x)):
        for target in {int(np.argmax(logits[i])), meta.classes.index("mel")}:
            ours = cam_heat(cams[i, target], size)
            package, explained = gradcam(model, torch.from_numpy(x[i : i + 1]), target)
            assert explained == target and ours.shape == package.shape == (meta.input_size,) * 2
            assert np.abs(ours - package).max() < 2e-3, (i, target)


def test_a_stale_export_beside_a_model_is_not_served(tmp_path, caplog):
    path = tiny_model(tmp_path / "m.safetensors")
    report, meta = export_model(path, path.with_suffix(".onnx"))
    assert report.ok and shipped_export(path) is not None
    update_meta(path, replace(meta, temperature=meta.temperature * 2))  # recalibrated after the export
    assert shipped_export(path) is None and "exported from another version" in caplog.text
    p = Predictor.from_path(path, threads=1)
    assert p.backend == "onnx" and p._runner.path != path.with_suffix(".onnx")  # a fresh export of the file as it is


def test_an_onnx_export_serves_on_its_own(tmp_path):
    path = tiny_model(tmp_path / "m.safetensors")
    onnx_path = tmp_path / "elsewhere" / "m.onnx"
    export_model(path, onnx_path)
    contract = read_contract(onnx_path)
    assert contract.meta == read_meta(path) and contract.cam
    images = synthetic_images(3, seed=9)
    expected = [r.predictions for r in Predictor.from_path(path, backend="torch", threads=1).predict_batch(images)]
    path.unlink()
    p = Predictor.from_path(onnx_path, threads=1)
    got = [r.predictions for r in p.predict_batch(images)]
    for a, b in zip(expected, got, strict=True):
        assert [c.code for c in a] == [c.code for c in b]
        assert max(abs(x.probability - y.probability) for x, y in zip(a, b, strict=True)) < 1e-4
    assert p.explain(images[0])[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="ONNX Runtime"):
        Predictor.from_path(onnx_path, backend="torch")


@pytest.mark.slow
def test_pip_install_serves_without_pytorch_within_the_size_limit(tmp_path):
    # What `make app` and the Dockerfile do: a new virtual environment and `pip install .` (non-editable: the
    # package as a user gets it, the model files included).
    venv = tmp_path / "venv"
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    minutes = (time.monotonic() - start) / 60
    size_mb = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20
    listed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True
    )
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    training = {"torch", "torchvision", "timm", "scikit-learn", "grad-cam", "matplotlib", "opencv-python-headless"}
    assert not installed & training, installed
    image = tmp_path / "lesion.png"
    from PIL import Image

    Image.fromarray(synthetic_images(1, size=(400, 300), seed=2)[0]).save(image)
    run = subprocess.run(
        [str(venv / "bin" / "dermsight"), "predict", "--json", str(image)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "DERMSIGHT_MODEL"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout)[0]["status"] in ("ok", "rejected")
    print(f"serving install: {size_mb:.0f} MB in {minutes:.1f} min")
    assert size_mb <= INSTALL_LIMIT_MB, f"{size_mb:.0f} MB"
