"""The way out of the pipeline: ONNX files that ONNX Runtime runs with the simulation's numbers.

    layers = ptq_layers(quantizer)                      # a PTQ decision, its assignment applied
    export_onnx("m.onnx", net, example, layers, fmt="qcdq", metadata=preprocessing(spec))
    sess = open_session("m.onnx", threads=1)            # onnxruntime alone, from the file
    metrics = evaluate_session(sess, batches, reference=simulation)

Modules: :mod:`.onnx` (QCDQ / QDQ graphs from the simulation's own integer codes) and
:mod:`.runtime` (ONNX Runtime sessions, held-out evaluation, latency).
"""
