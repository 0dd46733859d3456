"""The way out of the pipeline: ONNX files that ONNX Runtime runs with the simulation's numbers, and
what a runtime measures.

    layers = ptq_layers(quantizer)                      # a PTQ decision, its assignment applied
    export_onnx("m.onnx", net, example, layers, fmt="qcdq", metadata=preprocessing(spec))
    sess = open_session("m.onnx", threads=1)            # onnxruntime alone, from the file
    metrics = evaluate_session(sess, batches, reference=simulation)

Modules: :mod:`.onnx` (QCDQ / QDQ graphs from the simulation's own integer codes), :mod:`.graph`
(the float operators), :mod:`.runtime` (ONNX Runtime sessions, held-out evaluation, latency) and
:mod:`.latency` (per-layer latency tables, the input of the latency budgets; torch-free, in the
foundation layer because the config checks read tables). This package's own import is torch-free.
"""
