"""Faults that must show instead of serving nonsense: a model file changed after it was saved, a network whose
answers on fixed pictures are wrong or not finite, and a web app that says it is not ready while either holds."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from PIL import Image
from test_inference import tiny_model

from dermsight.inference.backends import TorchRunner
from dermsight.inference.export import synthetic_images
from dermsight.inference.predictor import Predictor
from dermsight.inference.selftest import SelfTestError, probe_record
from dermsight.models import load_model, save_model
from dermsight.models.bundle import ModelLoadError, read_meta, update_meta
from dermsight.web.app import create_app


def _overwrite_in_place(path, fill: float) -> None:
    """Every floating-point tensor set to ``fill``, the file's header (and so its recorded checksum) kept."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    tensors = safetensors.torch.load_file(str(path))
    tensors = {k: torch.full_like(v, fill) if v.is_floating_point() else v for k, v in tensors.items()}
    safetensors.torch.save_file(tensors, str(path), metadata=header)


def _probed(path):
    """The model at ``path`` with its self-test probe recorded, as `dermsight calibrate` records it."""
    model, meta = load_model(path)
    return update_meta(path, replace(meta, probe=probe_record(TorchRunner(model), meta)))


@pytest.mark.parametrize("fill", [float("nan"), 0.0])
def test_a_model_file_changed_after_saving_is_refused_at_load(tmp_path, fill):
    path = tiny_model(tmp_path / "m.safetensors")
    load_model(path)
    _overwrite_in_place(path, fill)
    with pytest.raises(ModelLoadError, match="damaged: its tensors do not match the checksum"):
        load_model(path)
    with pytest.raises(ModelLoadError, match="damaged"):
        Predictor.from_path(path, backend="torch")


def test_self_test_passes_a_sound_model_and_catches_wrong_or_non_finite_answers(tmp_path):
    path = _probed(tiny_model(tmp_path / "m.safetensors"))
    probe = read_meta(path).probe
    assert probe["images"] == 4 and np.asarray(probe["logits"]).shape == (4, 7)
    for backend in ("torch", "onnx"):
        report = Predictor.from_path(path, backend=backend, threads=1).self_test()
        assert report["checked"] == "finite outputs and recorded answers" and report["max_logit_difference"] < 1e-2
    # Weights saved properly (a valid checksum) but wrong: zeroed, or NaN, with the probe of the sound model.
    model, meta = load_model(path)
    for fill, message in ((0.0, "differ from those recorded"), (float("nan"), "not finite")):
        broken = tmp_path / f"broken_{fill}.safetensors"
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(fill)
        save_model(broken, model, meta)
        with pytest.raises(SelfTestError, match=message):
            Predictor.from_path(broken, backend="torch").self_test()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_images(1, size=(400, 300))[0]).save(buf, format="PNG")
    return buf.getvalue()


def test_the_web_app_is_ready_only_after_the_self_test_and_refuses_work_when_it_failed(tmp_path):
    sound = _probed(tiny_model(tmp_path / "sound.safetensors"))
    model, meta = load_model(sound)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    broken = save_model(tmp_path / "broken.safetensors", model, meta)
    config = {"TESTING": True, "RATE_LIMIT": "off", "SECRET_KEY": "test-only", "BACKEND": "torch"}

    app = create_app(None, config | {"MODEL": str(sound)})
    client = app.test_client()
    first = client.get("/healthz")  # asking starts the load in the background
    assert first.status_code == 503 and first.json["status"] == "starting" and first.json["ready"] is False
    app.extensions["dermsight.model"]._warming.join(60)
    ok = client.get("/healthz")
    assert ok.status_code == 200 and ok.json == ok.json | {"status": "ok", "ready": True, "model_loaded": True}

    app = create_app(None, config | {"MODEL": str(broken)})
    client = app.test_client()
    client.get("/healthz")
    app.extensions["dermsight.model"]._warming.join(60)
    failed = client.get("/healthz")
    assert failed.status_code == 503 and failed.json["status"] == "failed" and failed.json["ready"] is False
    assert "self-test" in failed.json["reason"]
    r = client.post("/api/v1/predict", data={"image": (io.BytesIO(_png()), "a.png")})
    assert r.status_code == 503 and r.json["error"] == "model_unavailable"
    assert "Traceback" not in r.get_data(as_text=True)
