rule train_model:
    output:
        model="results/{model}/model.pt",
    log:
        "logs/{model}/train_model.log",
    conda:
        "../envs/mpqflow.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        cfg=stage_params("seed", "evaluation"),
        code=code_version("models", "data", "train", "evaluate", "pipeline"),
    script:
        "../workflow_scripts/train_model.py"


rule calibrate:
    input:
        model="results/{model}/model.pt",
    output:
        calibration="results/{model}/calibration.pt",
    log:
        "logs/{model}/calibrate.log",
    conda:
        "../envs/mpqflow.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        cfg=stage_params("seed", "quant"),
        code=code_version("quant", "models", "data", "pipeline"),
    script:
        "../workflow_scripts/calibrate.py"
