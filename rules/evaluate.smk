rule evaluate_uniform:
    input:
        model="results/{model}/model.pt",
        calibration="results/{model}/calibration.pt",
    output:
        metrics="results/{model}/eval/uniform/{option}.json",
    log:
        "logs/{model}/eval/uniform/{option}.log",
    conda:
        "../envs/mpqflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        cfg=stage_params("seed", "quant", "evaluation"),
        code=code_version("quant", "models", "data", "evaluate", "pipeline"),
    script:
        "../workflow_scripts/evaluate_uniform.py"


rule uniform_table:
    input:
        uniform_evals,
    output:
        table="results/{model}/eval/uniform.csv",
    log:
        "logs/{model}/eval/uniform_table.log",
    localrule: True
    conda:
        "../envs/mpqflow.yaml"
    script:
        "../workflow_scripts/uniform_table.py"


rule evaluate_decision:
    input:
        model="results/{model}/model.pt",
        calibration="results/{model}/calibration.pt",
        decision="results/{model}/decisions/{method}/set_{n}x{s}/{budget}.json",
    output:
        metrics="results/{model}/eval/{method}/set_{n}x{s}/{budget}.json",
    log:
        "logs/{model}/eval/{method}/set_{n}x{s}/{budget}.log",
    conda:
        "../envs/mpqflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=gpu_if_cuda,
    params:
        cfg=stage_params("seed", "quant", "evaluation", "sensitivity"),
        code=code_version("quant", "models", "data", "evaluate", "pipeline", "search"),
    script:
        "../workflow_scripts/evaluate_decision.py"
