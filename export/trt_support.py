"""Which TensorRT versions can parse an ONNX file: every node checked against the ONNX parser's support.

The table below is transcribed for the ops EOIR graphs (and close relatives) can contain from:

* onnx-tensorrt ``docs/operators.md`` for TensorRT 10.0 ("supports operators in the inclusive range
  of opset 9 to opset 20"; FP32/FP16/BF16/INT32/INT64/BOOL tensors);
* the TensorRT 11.2.1 release notes: "GridSample 3D support: extends GridSample from 2D-only to 3D
  (rank-5 input) with FP32, FP16 and BF16; linear, nearest and cubic; align_corners 0/1; padding
  zeros, border, reflection". TensorRT 8.6–11.1 reject a rank-5 GridSample in the parser.
* TensorRT 11.x migration notes: weak typing (``BuilderFlag.FP16``) is removed; FP16 comes from
  the ONNX file's own types (strongly typed networks).

Opsets above a line's documented maximum (17 for 8.6, 20 for 10.0) are reported as a risk, not a failure.
The report never runs TensorRT; it is a static check, named as such in its ``assumes`` field.
"""

from __future__ import annotations

from typing import Any

# Version lines the report decides for (name, comparable key).
TRT_LINES: tuple[tuple[str, tuple[int, int]], ...] = (
    ("8.6", (8, 6)), ("10.x", (10, 0)), ("11.0-11.1", (11, 0)), ("11.2+", (11, 2)),
)
ASSUMES = ("onnx-tensorrt operator table of TensorRT 10.0 (opsets 9-20) and the TensorRT 11.2.1 release notes "
           "(5-D GridSample); static check, TensorRT not run")
# Highest opset each line's parser documentation names (8.5/8.6: 17; 10.0: 20; 11.x assumed like 10.0).
MAX_OPSET = {"8.6": 17, "10.x": 20, "11.0-11.1": 20, "11.2+": 20}

# op -> (first TensorRT version whose ONNX parser imports it, restriction note or "").
SUPPORT: dict[str, tuple[tuple[int, int], str]] = {
    "Add": ((8, 6), ""), "Sub": ((8, 6), ""), "Mul": ((8, 6), ""), "Div": ((8, 6), ""),
    "Abs": ((8, 6), ""), "Neg": ((8, 6), ""), "Max": ((8, 6), ""), "Min": ((8, 6), ""), "Sum": ((8, 6), ""),
    "And": ((8, 6), "BOOL"), "Or": ((8, 6), "BOOL"), "Not": ((8, 6), "BOOL"),
    "Equal": ((8, 6), ""), "Greater": ((8, 6), ""), "GreaterOrEqual": ((8, 6), ""), "Less": ((8, 6), ""),
    "LessOrEqual": ((8, 6), ""), "Where": ((8, 6), ""),
    "Cast": ((8, 6), "only TensorRT types (no DOUBLE/STRING)"), "CastLike": ((10, 0), ""),
    "Clip": ((8, 6), ""), "Floor": ((8, 6), ""), "Ceil": ((8, 6), ""), "Round": ((8, 6), ""),
    "Concat": ((8, 6), ""), "Constant": ((8, 6), ""), "ConstantOfShape": ((8, 6), ""),
    "Conv": ((8, 6), "2-D or 3-D; weights must be initializers"),
    "ConvTranspose": ((8, 6), "2-D or 3-D; weights must be initializers"),
    "Expand": ((8, 6), ""), "Flatten": ((8, 6), ""), "Identity": ((8, 6), ""),
    "Gather": ((8, 6), "INT32/INT64 indices"), "GatherElements": ((8, 6), ""), "GatherND": ((8, 6), ""),
    "GridSample": ((8, 6), "rank-4 input only before TensorRT 11.2; rank 5 from 11.2"),
    "InstanceNormalization": ((8, 6), "scale and B must be initializers; input rank 3-5"),
    "BatchNormalization": ((8, 6), ""), "LayerNormalization": ((8, 6), ""),
    "MatMul": ((8, 6), ""), "Gemm": ((8, 6), ""),
    "PRelu": ((8, 6), ""), "Relu": ((8, 6), ""), "LeakyRelu": ((8, 6), ""), "Sigmoid": ((8, 6), ""),
    "Tanh": ((8, 6), ""), "Exp": ((8, 6), ""), "Log": ((8, 6), ""), "Sqrt": ((8, 6), ""), "Pow": ((8, 6), ""),
    "Range": ((8, 6), "float start/limit/delta must be initializers"),
    "ReduceMean": ((8, 6), ""), "ReduceSum": ((8, 6), ""), "ReduceMax": ((8, 6), ""),
    "Reshape": ((8, 6), ""),
    "Resize": ((8, 6), "coordinate modes half_pixel, pytorch_half_pixel, tf_half_pixel_for_nn, asymmetric, "
                       "align_corners; linear/nearest/cubic"),
    "Shape": ((8, 6), ""), "Size": ((8, 6), ""), "Slice": ((8, 6), ""), "Split": ((8, 6), ""),
    "Squeeze": ((8, 6), ""), "Unsqueeze": ((8, 6), ""), "Transpose": ((8, 6), ""), "Tile": ((8, 6), ""),
    "Pad": ((8, 6), ""), "AveragePool": ((8, 6), "2-D or 3-D"), "MaxPool": ((8, 6), "2-D or 3-D"),
    "Softmax": ((8, 6), ""),
}
RESIZE_MODES = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
BAD_CAST_TYPES = {11: "DOUBLE", 8: "STRING", 12: "UINT32", 13: "UINT64"}


def _attr(node: Any, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _ranks(proto: Any) -> dict[str, int]:
    """Tensor name -> rank from shape inference (empty where inference fails)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # shape inference is best effort here; unknown ranks are reported as such
        return {}
    out = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if vi.type.tensor_type.HasField("shape"):
            out[vi.name] = len(vi.type.tensor_type.shape.dim)
    return out


def check_trt_support(proto: Any) -> dict[str, Any]:
    """Check every node of an ONNX model against TensorRT's ONNX-parser support.

    Args:
        proto: an ``onnx.ModelProto``.

    Returns:
        ``{"assumes": str, "opset": int, "ops": {op: {"count", "since", "note"}},
        "problems": [{"op", "node", "needs", "why"}], "parsable_by": [version lines],
        "not_parsable_by": {line: first reason}, "summary": str}``.
    """
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    initializers = {i.name for i in proto.graph.initializer}
    ranks = _ranks(proto)
    ops: dict[str, dict[str, Any]] = {}
    problems: list[dict[str, Any]] = []

    def need(op: str, node: str, version: tuple[int, int] | None, why: str) -> None:
        problems.append({"op": op, "node": node, "needs": version, "why": why})

    for node in proto.graph.node:
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        since, note = SUPPORT.get(op, (None, "not in the TensorRT ONNX parser table (custom domain or unsupported)"))
        entry = ops.setdefault(op, {"count": 0, "since": ".".join(map(str, since)) if since else None, "note": note})
        entry["count"] += 1
        if since is None:
            need(op, node.name, None, note)
            continue
        if op == "GridSample":
            rank = ranks.get(node.input[0])
            if rank is None or rank == 5:
                need(op, node.name, (11, 2), "5-D (volumetric) GridSample" + ("" if rank else " (rank assumed 5)"))
        elif op == "Resize":
            mode = _attr(node, "coordinate_transformation_mode", b"half_pixel")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            if mode not in RESIZE_MODES:
                need(op, node.name, None, f"Resize coordinate_transformation_mode {mode!r} is not supported")
        elif op == "Cast":
            to = _attr(node, "to")
            if to in BAD_CAST_TYPES:
                need(op, node.name, None, f"Cast to {BAD_CAST_TYPES[to]} is not a TensorRT type")
        elif op in ("InstanceNormalization", "Conv", "ConvTranspose"):
            weights = node.input[1:3] if op == "InstanceNormalization" else node.input[1:2]
            missing = [w for w in weights if w and w not in initializers]
            if missing:
                need(op, node.name, None, f"{op} {'scale/B' if op == 'InstanceNormalization' else 'weights'} must be "
                                          f"initializers, got computed tensors {missing}")
    not_parsable: dict[str, str] = {}
    for line, key in TRT_LINES:
        for p in problems:
            if p["needs"] is None or key < p["needs"]:
                needs = "no TensorRT version" if p["needs"] is None else f"TensorRT >= {p['needs'][0]}.{p['needs'][1]}"
                not_parsable[line] = f"{p['op']}: {p['why']} (needs {needs})"
                break
    parsable = [line for line, _ in TRT_LINES if line not in not_parsable]
    risks = [f"opset {opset} is above the {top} documented for TensorRT {line}"
             for line, top in MAX_OPSET.items() if line in parsable and opset > top]
    if parsable:
        summary = f"TensorRT {', '.join(parsable)} can parse this file"
    else:
        summary = "no TensorRT version can parse this file"
    if not_parsable:
        summary += "; not " + "; not ".join(f"{k} ({v})" for k, v in not_parsable.items())
    if risks:
        summary += "; risk: " + "; ".join(risks)
    return {"assumes": ASSUMES, "opset": opset, "ops": dict(sorted(ops.items())), "problems": problems,
            "parsable_by": parsable, "not_parsable_by": not_parsable, "risks": risks, "summary": summary}
