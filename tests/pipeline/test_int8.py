"""Static (calibrated, QDQ) int8 quantisation of an exported model, and `dermsight export --int8 static`.

A tiny random-weight EfficientNet-Lite0 (TF-style "same" padding, the shape arithmetic the quantiser must leave
alone) calibrated on synthetic lesion pictures and run on others: what is checked is the graph and how closely it
follows fp32, not how good a model is.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from PIL import Image
from test_inference import tiny_model

from dermsight.cli import main
from dermsight.inference.backends import OUTPUT_NAMES, OnnxRunner
from dermsight.inference.export import export_onnx, float_nodes, model_inputs, quantize_static_int8, synthetic_images
from dermsight.models import load_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    model, meta = load_model(tiny_model(root / "tiny.safetensors"))
    fp32 = export_onnx(model, meta, root / "tiny.onnx")
    calibration = model_inputs(meta, list(synthetic_images(16, seed=1)))
    static = quantize_static_int8(fp32, root / "tiny.static.onnx", calibration)
    return fp32, static, model_inputs(meta, list(synthetic_images(24, seed=2)))


def test_static_int8_is_a_qdq_graph_with_the_same_outputs(exported):
    fp32, static, x = exported
    graph = onnx.load(static).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    assert [o.name for o in graph.output] == list(OUTPUT_NAMES)
    # The convolutions' weights are stored as int8 (per channel) and dequantised, not kept in float.
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) >= 10
    # The padding arithmetic of TF-style "same" convolutions stays float: nothing a Pad's amounts are computed from
    # (after the Shape of its input) went through QuantizeLinear/DequantizeLinear (rounded, the paddings and so the
    # feature maps' sizes would change).
    fp32_graph = onnx.load(fp32).graph
    assert {"Ceil", "Cast", "Div"} <= {
        n.op_type for n in fp32_graph.node if n.name in set(float_nodes(onnx.load(fp32)))
    }
    producer = {o: n for n in graph.node for o in n.output}
    todo, upstream = [n.input[1] for n in graph.node if n.op_type == "Pad"], set()
    assert todo
    while todo:
        node = producer.get(todo.pop())
        if node is not None and node.name not in upstream:
            upstream.add(node.name)
            if node.op_type != "Shape":  # the size of a feature map, not its values
                todo.extend(node.input)
    assert upstream and not [n for n in graph.node if n.name in upstream and n.op_type.endswith("QuantizeLinear")]

    (l32, f32), (l8, f8) = OnnxRunner(fp32, 1)(x), OnnxRunner(static, 1)(x)
    assert l8.shape == l32.shape and f8.shape == f32.shape and np.isfinite(l8).all() and np.isfinite(f8).all()
    # Loose bounds: 8 bits on a random network follow fp32 closely.
    # (Measured: correlation 0.999, 23 of 24 top classes, features 5% apart; with the padding arithmetic quantised
    # too, 0.80, 19 of 24 and 74%.)
    assert np.corrcoef(l8.ravel(), l32.ravel())[0, 1] > 0.97
    assert np.mean(l8.argmax(1) == l32.argmax(1)) >= 0.85
    assert np.median(np.linalg.norm(f8 - f32, axis=1) / np.linalg.norm(f32, axis=1)) < 0.25


def test_static_int8_needs_calibration_inputs(exported, tmp_path):
    fp32, _, _ = exported
    with pytest.raises(ValueError, match="calibration inputs"):
        quantize_static_int8(fp32, tmp_path / "x.onnx", np.zeros((0, 3, 64, 64), np.float32))
    assert not (tmp_path / "x.onnx").exists()


def test_export_cli_int8_static(tmp_path, capsys):
    model_path = tiny_model(tmp_path / "m.safetensors")
    for folder, seed in (("check", 0), ("calib", 10)):
        for i, img in enumerate(synthetic_images(4, seed=seed)):
            (tmp_path / folder).mkdir(exist_ok=True)
            Image.fromarray(img).save(tmp_path / folder / f"{i}.png")
    args = ["export", "--model", str(model_path), "--out", str(tmp_path / "m.onnx"), "--check-images",
            str(tmp_path / "check"), "--int8", "static"]  # fmt: skip
    # Static int8 without calibration images, or calibrated on the check images, is a usage error.
    assert main(args) == 2 and "calibration images" in capsys.readouterr().err
    assert main([*args, "--calibration-images", str(tmp_path / "check")]) == 2
    assert "include check images" in capsys.readouterr().err
    assert main([*args, "--calibration-images", str(tmp_path / "calib")]) == 0
    out = capsys.readouterr().out
    assert "static QDQ, calibrated on 4 image(s)" in out and (tmp_path / "m.int8.onnx").is_file()
