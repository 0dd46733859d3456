"""The workflow's stages: one module per stage, the only thing its workflow scripts call.

    train        train (or load) the FP model                             (torch, no quantizers)
    calibrate    calibrate every quantizer; write the layer table          (torch)
    sensitivity  one estimator on one pool batch; pool batches into a set  (torch)
    solve        one exact integer program per (method, set, budget)      (no torch)
    evaluate     held-out metrics of uniform assignments and decisions    (torch)
    study        the study's tables and plots, the PTQ table and plot      (no torch)
    ptq          the PTQ scheme study                                     (torch)

Each stage takes typed config sections (:mod:`mpqflow.config`) and paths; no stage imports another.
Rules hash the import closure of their stage module (:mod:`mpqflow.codehash`), so editing a stage's
code reruns that stage and what follows, nothing before it.
"""
