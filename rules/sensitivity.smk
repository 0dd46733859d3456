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
    threads: config["threads"]
    resources:
        mem_mb=6000,
        runtime=60,
        gpu=gpu_if_cuda,
    params:
        model=model_config,
        quant=config["quant"],
        plan=sample_plan(with_pool=False),
        settings=estimator_settings,
        code=stage_code("sensitivity"),
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
        code=stage_code("sensitivity"),
    script:
        "../workflow_scripts/pool_set.py"
