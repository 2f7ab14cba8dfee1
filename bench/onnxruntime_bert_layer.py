#!/usr/bin/env python3
"""Times ONNX Runtime on the BERT-base layer that bench_compress_layer times in cpet (8 sequences x 128 tokens,
d 768, 12 heads, d_ff 3072, post-LN, GELU-erf), fp32 and with ORT's dynamic int8 quantisation, at 1 and 2 threads.

    pip install onnx onnxruntime numpy
    python3 bench/onnxruntime_bert_layer.py [--reps 20] [--threads 1 2]

The layer is built as an ONNX graph from seeded random weights (the same shapes, not the same values: speed does
not depend on them) with plain ops (MatMul, Add, Reshape, Transpose, Softmax, Erf, LayerNormalization, opset 17),
so ONNX Runtime applies its own default graph fusions. Variants:
  fp32               the graph as built
  int8_per_tensor    onnxruntime.quantization.quantize_dynamic(weight_type=QInt8), ORT's default
  int8_per_channel   the same with per_channel=True
  int8_exact         int8_per_tensor run with session.x64quantprecision=1: ORT's default AVX2 int8 kernel sums
                     pairs of byte products with vpmaddubsw, which saturates at 16 bits; this option asks for the
                     exact path (what cpet's W8A8 computes)
For each it prints the median wall time of `--reps` runs after warm-up, per thread count, and the relative output
error against the fp32 graph. The numbers go in the README beside bench_compress_layer's, with the CPU's name.
Tooling only: nothing in cpet's build or tests runs this.
"""
import argparse
import logging
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

B, S, D, H, F = 8, 128, 768, 12, 3072
DH = D // H


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def build_layer(seed=1):
    rng = np.random.default_rng(seed)
    inits = []

    def w(name, shape, scale):
        inits.append(numpy_helper.from_array((rng.uniform(-scale, scale, shape)).astype(np.float32), name))
        return name

    def c(name, values, dtype=np.int64):
        inits.append(numpy_helper.from_array(np.array(values, dtype=dtype), name))
        return name

    nodes = []

    def node(op, ins, outs, **kw):
        nodes.append(helper.make_node(op, ins, outs, **kw))
        return outs[0]

    s_in = 1.0 / np.sqrt(D)
    x = "x"
    # weights stored [in, out] (x @ W), as torch.onnx exports nn.Linear
    for n in ("q", "k", "v"):
        mm = node("MatMul", [x, w(f"W{n}", (D, D), s_in)], [f"{n}_mm"])
        node("Add", [mm, w(f"b{n}", (D,), 0.02)], [f"{n}_lin"])
    shape_heads = c("shape_heads", [B, S, H, DH])
    for n in ("q", "k", "v"):
        node("Reshape", [f"{n}_lin", shape_heads], [f"{n}_h"])
    node("Transpose", ["q_h"], ["q_t"], perm=[0, 2, 1, 3])
    node("Transpose", ["k_h"], ["k_t"], perm=[0, 2, 3, 1])
    node("Transpose", ["v_h"], ["v_t"], perm=[0, 2, 1, 3])
    node("MatMul", ["q_t", "k_t"], ["scores_raw"])
    node("Mul", ["scores_raw", c("inv_sqrt_dh", 1.0 / np.sqrt(DH), np.float32)], ["scores"])
    node("Softmax", ["scores"], ["probs"], axis=-1)
    node("MatMul", ["probs", "v_t"], ["ctx_t"])
    node("Transpose", ["ctx_t"], ["ctx_h"], perm=[0, 2, 1, 3])
    node("Reshape", ["ctx_h", c("shape_model", [B, S, D])], ["ctx"])
    node("MatMul", ["ctx", w("Wo", (D, D), s_in)], ["o_mm"])
    node("Add", ["o_mm", w("bo", (D,), 0.02)], ["o_lin"])
    node("Add", ["o_lin", x], ["res1"])
    node("LayerNormalization", ["res1", w("g1", (D,), 1.0), w("be1", (D,), 0.02)], ["h1"], axis=-1, epsilon=1e-12)
    node("MatMul", ["h1", w("Wup", (D, F), s_in)], ["up_mm"])
    node("Add", ["up_mm", w("bup", (F,), 0.02)], ["up"])
    # GELU (erf): 0.5·u·(1 + erf(u/√2)); ORT fuses this pattern into its Gelu kernel
    node("Div", ["up", c("sqrt2", np.sqrt(2.0), np.float32)], ["up_s"])
    node("Erf", ["up_s"], ["erf"])
    node("Add", ["erf", c("one", 1.0, np.float32)], ["erf1"])
    node("Mul", ["up", "erf1"], ["g_u"])
    node("Mul", ["g_u", c("half", 0.5, np.float32)], ["act"])
    node("MatMul", ["act", w("Wdown", (F, D), 1.0 / np.sqrt(F))], ["down_mm"])
    node("Add", ["down_mm", w("bdown", (D,), 0.02)], ["down"])
    node("Add", ["down", "h1"], ["res2"])
    node("LayerNormalization", ["res2", w("g2", (D,), 1.0), w("be2", (D,), 0.02)], ["y"], axis=-1, epsilon=1e-12)

    graph = helper.make_graph(nodes, "bert_base_layer",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, S, D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def time_session(path, x, threads, reps, extra=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    for k, v in (extra or {}).items():
        so.add_session_config_entry(k, v)
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    for _ in range(3):
        out = sess.run(None, {"x": x})[0]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()

    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's advice to pre-process is not about speed
    x = np.random.default_rng(2).uniform(-1, 1, (B, S, D)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = os.path.join(tmp, "layer_fp32.onnx")
        onnx.save(build_layer(), fp32)
        pt = os.path.join(tmp, "layer_int8_pt.onnx")
        pc = os.path.join(tmp, "layer_int8_pc.onnx")
        quantize_dynamic(fp32, pt, weight_type=QuantType.QInt8)
        quantize_dynamic(fp32, pc, weight_type=QuantType.QInt8, per_channel=True)
        variants = [("fp32", fp32, None), ("int8_per_tensor", pt, None), ("int8_per_channel", pc, None),
                    ("int8_exact", pt, {"session.x64quantprecision": "1"})]
        print(f"ONNX Runtime {ort.__version__} on {cpu_name()}; BERT-base layer {B}x{S}, medians of {args.reps}")
        for t in args.threads:
            ref = None
            for name, path, extra in variants:
                ms, out = time_session(path, x, t, args.reps, extra)
                if ref is None:
                    ref = out
                err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                print(f"onnxruntime/{name}/bert_base_8x128/t{t}: {ms:8.2f} ms   rel. error vs fp32 {err:.2e}")


if __name__ == "__main__":
    main()
