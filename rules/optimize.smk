# Right after calibration (priority), before the sensitivity stage: a budget no decision can meet
# stops the run here, naming the smallest achievable size or BitOPs.
rule check_budgets:
    input:
        unpack(latency_table),
        layers=paths.LAYERS,
    output:
        caps=paths.BUDGETS,
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
        unpack(latency_table),
        layers=paths.LAYERS,
        pooled=method_set_file,
    output:
        decision=paths.DECISION,
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
        settings=solve_settings,
        code=stage_code("solve"),
    script:
        "../workflow_scripts/solve_budget.py"


# The seed's sanity check, recorded per (method, set): with no budget, does the method's estimate
# pick the highest-precision option everywhere? One job per method solves all its sets (small
# solves: a job each would cost more in start-up than in solving).
rule sanity_check:
    input:
        unpack(latency_table),
        layers=paths.LAYERS,
        pooled=method_set_files,
    output:
        result=paths.SANITY,
    log:
        "logs/{model}/sanity/{method}.log",
    conda:
        "../envs/mpqflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=lambda wildcards: int(config["solver"]["time_limit"] / 60) + 5,
    params:
        solver=config["solver"],
        settings=solve_settings,
        code=stage_code("solve"),
    script:
        "../workflow_scripts/sanity_check.py"
