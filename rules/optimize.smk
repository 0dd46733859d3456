rule solve_budget:
    input:
        calibration="results/{model}/calibration.pt",
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
        solver=lookup(dpath="solver", within=config),
        code=code_version("optimize", "methods", "search"),
    script:
        "../workflow_scripts/solve_budget.py"
