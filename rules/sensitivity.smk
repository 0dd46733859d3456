rule sensitivity_batch:
    input:
        model="results/{model}/model.pt",
        calibration="results/{model}/calibration.pt",
    output:
        batch="results/{model}/sensitivity/{estimator}/batch_{batch}.npz",
    log:
        "logs/{model}/sensitivity/{estimator}/batch_{batch}.log",
    conda:
        "../envs/mpqflow.yaml"
    threads: 2
    resources:
        mem_mb=6000,
        runtime=60,
        gpu=gpu_if_cuda,
    params:
        cfg=stage_params("seed", "quant", "evaluation"),
        sensitivity=batch_settings,
        code=code_version("sensitivity", "quant", "models", "data", "pipeline"),
    script:
        "../workflow_scripts/sensitivity_batch.py"


rule pool_set:
    input:
        batches=set_batch_files,
    output:
        pooled="results/{model}/sensitivity/{estimator}/set_{n}x{s}.npz",
    log:
        "logs/{model}/sensitivity/{estimator}/set_{n}x{s}.log",
    localrule: True
    conda:
        "../envs/mpqflow.yaml"
    params:
        code=code_version("sensitivity"),
    script:
        "../workflow_scripts/pool_set.py"
