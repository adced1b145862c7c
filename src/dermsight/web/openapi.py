"""The OpenAPI 3.1 document of the JSON API. The tests check that it lists every API route and nothing else."""

from __future__ import annotations

from typing import Any

from dermsight import __version__
from dermsight.domain.classes import CONDITIONS, Malignancy
from dermsight.web.service import human_size

# Every `error` code the app answers with (app.py's handlers, security.py and service.py's refusals).
ERROR_CODES = (
    "no_image", "not_a_file", "empty_file", "two_photos", "unreadable_image", "bad_request", "csrf_failed",
    "not_found", "method_not_allowed", "too_large", "form_too_large", "unsupported_type", "rate_limited",
    "internal_error", "malformed_form", "model_unavailable",
)  # fmt: skip


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _ok(description: str, schema: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def _everywhere(paths: dict[str, Any]) -> dict[str, Any]:
    """Every operation also answers 405 (another method; `Allow` lists the right ones) and 500."""
    not_allowed = _error("This address does not accept that method; `Allow` lists the ones it does.")
    not_allowed["headers"] = {"Allow": {"schema": {"type": "string"}, "description": "e.g. OPTIONS, POST"}}
    for item in paths.values():
        for operation in item.values():
            operation["responses"].setdefault("405", not_allowed)
            operation["responses"].setdefault("500", _error("Internal error (no details are given out)."))
    return paths


def openapi_document(max_upload_bytes: int) -> dict[str, Any]:
    codes = list(CONDITIONS)
    malignancy = [str(m) for m in Malignancy]
    too_many = _error("Too many requests from this client; retry after the `Retry-After` header's seconds.")
    too_many["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds to wait"}}
    unavailable = _error("The model failed its start-up self-test (`model_unavailable`); `/healthz` gives the reason.")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dermsight API",
            "version": __version__,
            "description": (
                "Skin-lesion image classification. An aid, not a medical device: results are not a diagnosis. "
                "Uploads are processed in memory and never stored."
            ),
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "/"}],
        "paths": _everywhere(
            {
                "/api/v1/predict": {
                    "post": {
                        "operationId": "predict",
                        "summary": "Classify one photo of a skin lesion",
                        "requestBody": {
                            "required": True,
                            "content": {
                                "multipart/form-data": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["image"],
                                        "properties": {
                                            "image": {
                                                "type": "string",
                                                "format": "binary",
                                                "description": (
                                                    "JPEG, PNG, WebP, BMP or TIFF (checked from the bytes), at most "
                                                    f"{human_size(max_upload_bytes)} for the whole request"
                                                ),
                                            }
                                        },
                                    },
                                    "encoding": {"image": {"contentType": "image/*"}},
                                }
                            },
                        },
                        "responses": {
                            "200": _ok(
                                "The assessment. `status` is `rejected`, with a `reason` and photo `tips`, when the "
                                "image is readable but cannot be assessed (blurred, not skin, ...).",
                                "Prediction",
                            ),
                            "400": _error("No image field, or the image is unreadable or corrupt."),
                            "413": _error(
                                "The request is larger than the upload limit (`too_large`), or its text fields are too "
                                "large or too many, as when an image is sent as a text field (`form_too_large`)."
                            ),
                            "415": _error("The file is not a supported image type."),
                            "429": too_many,
                            "503": unavailable,
                        },
                    }
                },
                "/api/v1/conditions": {
                    "get": {
                        "operationId": "listConditions",
                        "summary": "Every condition dermsight knows, in brief",
                        "responses": {"200": _ok("The condition list.", "ConditionList")},
                    }
                },
                "/api/v1/conditions/{code}": {
                    "get": {
                        "operationId": "getCondition",
                        "summary": "What a condition is, its symptoms, causes, treatment and when to see a doctor",
                        "parameters": [
                            {
                                "name": "code",
                                "in": "path",
                                "required": True,
                                "description": "a class code, in any case (`scc` is `SCC`)",
                                "schema": {"type": "string", "examples": codes},
                            }
                        ],
                        "responses": {
                            "200": _ok("The condition.", "Condition"),
                            "404": _error("No condition has this code."),
                        },
                    }
                },
                "/api/v1/model": {
                    "get": {
                        "operationId": "getModel",
                        "summary": "The served model's card: classes, training data, measured metrics",
                        "responses": {
                            "200": _ok("The model card.", "Model"),
                            "503": unavailable,
                        },
                    }
                },
                "/api/v1/openapi.json": {
                    "get": {
                        "operationId": "getOpenAPI",
                        "summary": "This document",
                        "responses": {
                            "200": {"description": "OpenAPI 3.1 document", "content": {"application/json": {}}}
                        },
                    }
                },
                "/healthz": {
                    "get": {
                        "operationId": "health",
                        "summary": "Readiness: 200 once the model is loaded and passed its start-up self-test",
                        "responses": {
                            "200": _ok("Ready to answer.", "Health"),
                            "503": _ok("Starting (the model is loading) or failed (see reason).", "Health"),
                        },
                    }
                },
            }
        ),
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["status", "error", "message"],
                    "properties": {
                        "status": {"const": "error"},
                        "error": {
                            "type": "string",
                            "enum": list(ERROR_CODES),
                            "description": "stable code (csrf_failed only on the web form, never on the API)",
                        },
                        "message": {"type": "string", "description": "a sentence fit to show a user"},
                        "tips": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "ClassProbability": {
                    "type": "object",
                    "required": ["code", "name", "probability"],
                    "properties": {
                        "code": {"type": "string", "enum": codes},
                        "name": {"type": "string"},
                        "probability": {"type": "number", "minimum": 0, "maximum": 1},
                    },
                },
                "Advice": {
                    "type": "object",
                    "required": ["level", "title", "message"],
                    "properties": {
                        "level": {"type": "string", "enum": ["see_doctor", "monitor", "retake"]},
                        "title": {"type": "string"},
                        "message": {"type": "string"},
                    },
                },
                "Prediction": {
                    "type": "object",
                    "required": [
                        "status",
                        "reason",
                        "predictions",
                        "malignant",
                        "uncertain",
                        "concerning_probability",
                        "scores",
                        "model",
                        "advice",
                    ],
                    "properties": {
                        "status": {"type": "string", "enum": ["ok", "rejected"]},
                        "reason": {"type": ["string", "null"], "description": "why the image was rejected"},
                        "predictions": {
                            "type": "array",
                            "description": "every class, most probable first; empty when rejected",
                            "items": {"$ref": "#/components/schemas/ClassProbability"},
                        },
                        "malignant": {
                            "type": ["boolean", "null"],
                            "description": "top class malignant or pre-malignant; null when rejected",
                        },
                        "uncertain": {
                            "type": "boolean",
                            "description": "the model is not confident (top class under 50%); false when rejected",
                        },
                        "concerning_probability": {
                            "type": ["number", "null"],
                            "description": "sum of the probabilities of the malignant and pre-malignant classes; "
                            "null when rejected",
                        },
                        "refer_from": {
                            "type": ["number", "null"],
                            "description": "the model's referral threshold: malignant and pre-malignant classes "
                            "together this probable advise seeing a doctor (null: the default, 0.15)",
                        },
                        "scores": {
                            "type": "object",
                            "additionalProperties": {"type": "number"},
                            "description": "image-quality and out-of-distribution measurements behind the result "
                            "(no out-of-distribution ones when the image-quality checks refused the photo)",
                        },
                        "model": {"type": "string"},
                        "advice": {"$ref": "#/components/schemas/Advice"},
                        "tips": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "ConditionBrief": {
                    "type": "object",
                    "required": ["code", "name", "malignancy", "urgency", "summary"],
                    "properties": {
                        "code": {"type": "string", "enum": codes},
                        "name": {"type": "string"},
                        "malignancy": {"type": "string", "enum": malignancy},
                        "urgency": {"type": "string", "enum": ["urgent", "soon", "routine"]},
                        "summary": {"type": "string"},
                    },
                },
                "ConditionList": {
                    "type": "object",
                    "required": ["conditions"],
                    "properties": {
                        "conditions": {"type": "array", "items": {"$ref": "#/components/schemas/ConditionBrief"}}
                    },
                },
                "Condition": {
                    "allOf": [
                        {"$ref": "#/components/schemas/ConditionBrief"},
                        {
                            "type": "object",
                            "required": [
                                "what_it_is",
                                "symptoms",
                                "causes_and_risk_factors",
                                "treatment",
                                "see_a_doctor",
                                "sources",
                            ],
                            "properties": {
                                "same_condition_codes": {"type": "array", "items": {"type": "string"}},
                                "also_known_as": {"type": "array", "items": {"type": "string"}},
                                "what_it_is": {"type": "array", "items": {"type": "string"}},
                                "symptoms": {"type": "array", "items": {"type": "string"}},
                                "causes_and_risk_factors": {"type": "array", "items": {"type": "string"}},
                                "treatment": {"type": "array", "items": {"type": "string"}},
                                "see_a_doctor": {"type": "string"},
                                "sources": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["name", "url"],
                                        "properties": {"name": {"type": "string"}, "url": {"type": "string"}},
                                    },
                                },
                            },
                        },
                    ]
                },
                "Model": {
                    "type": "object",
                    "required": ["architecture", "taxonomy", "classes", "metrics"],
                    "properties": {
                        "model": {"type": "string", "description": "model file name"},
                        "backend": {"type": "string", "enum": ["onnx", "torch"]},
                        "architecture": {"type": "string", "description": "the (first) network's timm architecture"},
                        "network": {
                            "type": "string",
                            "description": "the whole network as people read it, e.g. "
                            "'tf_efficientnet_lite0 + mobilenetv2_100 (ensemble)'",
                        },
                        "members": {
                            "type": "integer",
                            "minimum": 1,
                            "description": "networks whose logits are averaged (1: one model)",
                        },
                        "taxonomy": {"type": "string"},
                        "classes": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "code": {"type": "string"},
                                    "name": {"type": "string"},
                                    "malignancy": {"type": "string", "enum": malignancy},
                                },
                            },
                        },
                        "input_size": {"type": "integer"},
                        "temperature": {"type": "number"},
                        "weights": {"type": "object", "description": "the (first) network's starting weights"},
                        "started_from": {
                            "type": "array",
                            "description": "where each network started training, one entry per member",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "architecture": {"type": "string"},
                                    "source": {"type": "string", "description": "hub, offline:<package>, file:, none"},
                                    "description": {"type": "string"},
                                },
                            },
                        },
                        "tta_views": {
                            "type": "integer",
                            "enum": [1, 8],
                            "description": "views averaged per prediction (8: the square's symmetries; 1: the photo "
                            "turned to a canonical orientation)",
                        },
                        "training_data": {"type": "string"},
                        "split": {"type": "string"},
                        "metrics": {"type": "object", "description": "measured metrics per evaluated split"},
                        "created": {"type": "string"},
                        "dermsight_version": {"type": "string"},
                        "threads": {"type": "integer", "description": "intra-op threads of this worker"},
                        "ood": {
                            "type": ["object", "null"],
                            "description": "the not-a-lesion gate's statistics and threshold; null without a gate",
                        },
                        "quality_gate": {"type": "object", "description": "the image-quality checks' thresholds"},
                        "source_short_side": {
                            "type": "integer",
                            "description": "inputs are brought to the training images' detail: this shorter side",
                        },
                        "source_jpeg_quality": {"type": "integer", "description": "and this JPEG quality (0: none)"},
                        "colour_constancy": {
                            "type": "integer",
                            "description": "Shades of Gray p applied to every input (0: none)",
                        },
                    },
                },
                "Health": {
                    "type": "object",
                    "required": ["status", "ready"],
                    "properties": {
                        "status": {"enum": ["ok", "starting", "failed"]},
                        "ready": {"type": "boolean"},
                        "version": {"type": "string"},
                        "model_loaded": {"type": "boolean"},
                        "reason": {"type": "string", "description": "why the model failed to load or self-test"},
                    },
                },
            }
        },
    }
