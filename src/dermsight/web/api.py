"""JSON API v1, described by the OpenAPI document at /api/v1/openapi.json (`dermsight.web.openapi`).

Stateless: no cookies, so no CSRF token; the rate limit still applies to predictions.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify, request

from dermsight.domain.results import PredictionResult
from dermsight.domain.triage import advise
from dermsight.web.openapi import openapi_document
from dermsight.web.security import RequestRefused, enforce_rate_limit
from dermsight.web.service import analyse, read_upload, refuse_unreadable_form

api = Blueprint("api", __name__, url_prefix="/api/v1")


def _knowledge():
    return current_app.extensions["dermsight.knowledge"]


def _model():
    return current_app.extensions["dermsight.model"]


def prediction_json(result: PredictionResult) -> dict[str, Any]:
    body = result.to_dict()
    body.pop("image", None)  # uploads have no name worth echoing; names are never kept
    body["advice"] = advise(result, _knowledge()).to_dict()
    if result.status != "ok":
        body["tips"] = list(_knowledge().photo_tips)
    return body


@api.post("/predict")
def predict():
    enforce_rate_limit()
    refuse_unreadable_form(request)
    data = read_upload(request.files, current_app.config["MAX_CONTENT_LENGTH"], request.form, api=True)
    return jsonify(prediction_json(analyse(_model(), data, explain=False).result))


@api.get("/conditions")
def conditions():
    return jsonify(conditions=[c.to_dict(brief=True) for c in _knowledge().conditions.values()])


@api.get("/conditions/<code>")
def condition(code: str):
    info = _knowledge().get(code)
    if info is None:
        raise RequestRefused(404, "No condition has this code; GET /api/v1/conditions lists them.", "not_found", False)
    return jsonify(info.to_dict())


@api.get("/model")
def model():
    service = _model()
    body = dict(service.info())
    meta = service.meta
    body.setdefault("split", meta.split.describe() if meta.split else "")
    body.setdefault("weights", meta.weights)
    # The training config is never served: it holds paths of the machine the model was trained on.
    body.pop("config", None)
    return jsonify(body)


@api.get("/openapi.json")
def openapi():
    return jsonify(openapi_document(current_app.config["MAX_CONTENT_LENGTH"]))
