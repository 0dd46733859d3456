rule evaluate_uniform:
    input:
        model=paths.CHECKPOINT,
        calibration=paths.CALIBRATION,
    output:
        expand(paths.UNIFORM_EVAL, option=OPTIONS, allow_missing=True),
    log:
        "logs/{model}/eval/uniform.log",
    conda:
        "../envs/mpqflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=gpu_if_cuda,
    params:
        model=model_config,
        seed=config["seed"],
        quant=config["quant"],
        evaluation=config["evaluation"],
        options=OPTIONS,
        code=stage_code("evaluate"),
    script:
        "../workflow_scripts/evaluate_uniform.py"


rule uniform_table:
    input:
        uniform_evals,
    output:
        table=report(
            paths.UNIFORM_TABLE,
            caption="../report/uniform_table.rst",
            category="{model}",
        ),
    log:
        "logs/{model}/eval/uniform_table.log",
    localrule: True
    conda:
        "../envs/mpqflow.yaml"
    params:
        code=stage_code("uniform_report"),
    script:
        "../workflow_scripts/uniform_table.py"


# One job per (method, set) evaluates all its budgets: the model, data and torch load once per
# job instead of once per decision, and every decision still gets its own file.
rule evaluate_decisions:
    input:
        unpack(decision_masks),
        model=paths.CHECKPOINT,
        calibration=paths.CALIBRATION,
        decisions=set_decisions,
    output:
        expand(paths.EVAL, budget=config["budgets"], allow_missing=True),
    log:
        "logs/{model}/eval/{method}/set_{n}x{s}.log",
    conda:
        "../envs/mpqflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=gpu_if_cuda,
    params:
        model=model_config,
        quant=config["quant"],
        plan=sample_plan(with_pool=True),
        evaluation=config["evaluation"],
        code=stage_code("evaluate"),
    script:
        "../workflow_scripts/evaluate_decisions.py"
