rule evaluate_uniform:
    input:
        model="results/{model}/model.pt",
        calibration="results/{model}/calibration.pt",
    output:
        metrics="results/{model}/eval/uniform/{option}.json",
    log:
        "logs/{model}/eval/uniform/{option}.log",
    params:
        cfg=stage_params("seed", "quant", "evaluation"),
        code=code_version("quant", "models", "data", "evaluate", "pipeline"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
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
    script:
        "../workflow_scripts/uniform_table.py"
