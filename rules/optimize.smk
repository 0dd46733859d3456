# Right after calibration (priority), before the sensitivity stage: a budget no decision can meet
# stops the run here, naming the smallest achievable size or BitOPs.
rule check_budgets:
    input:
        layers="results/{model}/layers.json",
    output:
        caps="results/{model}/budgets.json",
    log:
        "logs/{model}/check_budgets.log",
    priority: 100
    localrule: True
    conda:
        "../envs/mpqflow.yaml"
    params:
        budgets=config["budgets"],
        code=stage_code("solve"),
    script:
        "../workflow_scripts/check_budgets.py"


rule solve_budget:
    input:
        layers="results/{model}/layers.json",
        pooled=method_set_file,
    output:
        decision="results/{model}/decisions/{method}/set_{n}x{s}/{budget}.json",
    log:
        "logs/{model}/decisions/{method}/set_{n}x{s}/{budget}.log",
    conda:
        "../envs/mpqflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=lambda wildcards: int(config["solver"]["time_limit"] / 60) + 5,
    params:
        solver=config["solver"],
        alpha=solve_alpha,
        code=stage_code("solve"),
    script:
        "../workflow_scripts/solve_budget.py"
