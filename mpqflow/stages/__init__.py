"""The workflow's stages: one module per stage, the only thing its workflow scripts call.

    train             train (or load) the FP model                               (torch, no quantizers)
    calibrate         calibrate every quantizer; write the layer table            (torch)
    sensitivity       one estimator on one pool batch; pool batches into a set    (torch)
    limpq             LIMPQ's indicator training (or import) of one set           (torch)
    solve             one exact integer program per (method, set, budget)         (no torch)
    evaluate          held-out metrics of uniform assignments, decisions and fine-tuned models (torch)
    uniform_report    the uniform options' table                                  (no torch)
    study             the variance study's tables and plots                       (no torch)
    ptq               one PTQ scheme variant of the PTQ study                     (torch)
    ptq_report        the PTQ study's table and plot                              (no torch)
    finetune          LSQ fine-tuning of one decision or uniform option           (torch)
    finetune_report   PTQ vs fine-tuned: the fine-tuning study's table and plot   (no torch)
    gradquant         one run of the gradient-quantization study                  (torch)
    gradquant_report  the gradient-quantization study's tables, plots and report  (no torch)

Each stage takes typed config sections (:mod:`mpqflow.config`) and paths; no stage imports another.
Rules hash the import closure of their stage module (:mod:`mpqflow.codehash`), so editing a stage's
code reruns that stage and what follows, nothing before it; each report has its own stage, so
editing one report's code redraws only that report.
"""
