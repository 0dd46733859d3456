rule ptq_variant:
    input:
        model=paths.CHECKPOINT,
    output:
        metrics=paths.PTQ_VARIANT,
    log:
        "logs/{model}/ptq/{variant}.log",
    wildcard_constraints:
        variant="|".join(config["ptq"]["variants"]),
    conda:
        "../envs/mpqflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        model=model_config,
        seed=config["seed"],
        quant=config["quant"],
        ptq=config["ptq"],
        evaluation=config["evaluation"],
        code=stage_code("ptq"),
    script:
        "../workflow_scripts/ptq_variant.py"


rule ptq_table:
    input:
        expand(paths.PTQ_VARIANT, variant=config["ptq"]["variants"], allow_missing=True),
    output:
        table=report(
            paths.PTQ_TABLE,
            caption="../report/ptq_table.rst",
            category="{model}",
        ),
    log:
        "logs/{model}/ptq_table.log",
    localrule: True
    conda:
        "../envs/mpqflow.yaml"
    params:
        code=stage_code("ptq_report"),
    script:
        "../workflow_scripts/ptq_table.py"


rule ptq_plot:
    input:
        table=report(
            paths.PTQ_TABLE,
            caption="../report/ptq_table.rst",
            category="{model}",
        ),
    output:
        plot=report(
            paths.plot("ptq"),
            caption="../report/ptq.rst",
            category="{model}",
        ),
    log:
        "logs/{model}/ptq_plot.log",
    localrule: True
    conda:
        "../envs/mpqflow.yaml"
    params:
        plots=config["plots"],
        code=stage_code("ptq_report"),
    script:
        "../workflow_scripts/ptq_plot.py"
