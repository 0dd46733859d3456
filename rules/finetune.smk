rule finetune:
    input:
        unpack(finetune_decision),
        model=paths.CHECKPOINT,
        calibration=paths.CALIBRATION,
    output:
        model=paths.FINETUNED,
        export=paths.FINETUNED_EXPORT,
        export_meta=paths.FINETUNED_EXPORT_META,
    log:
        "logs/{model}/finetune/{target}.log",
    wildcard_constraints:
        target="|".join(re.escape(t) for t in FINETUNE_TARGETS) or "none",
    conda:
        "../envs/mpqflow.yaml"
    threads: finetune_threads
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=finetune_gpus,
    params:
        model=model_config,
        seed=config["seed"],
        quant=config["quant"],
        # the targets list is not a param: adding a target does not rerun the others
        settings=FINETUNE.to_dict(),
        option=finetune_option,
        code=stage_code("finetune"),
        # epoch checkpoints: outside the outputs, so an incomplete job's cleanup keeps them to resume
        state_dir=paths.FINETUNE_STATE,
    script:
        "../workflow_scripts/finetune.py"


rule evaluate_finetuned:
    input:
        finetuned=paths.FINETUNED,
        model=paths.CHECKPOINT,
        calibration=paths.CALIBRATION,
    output:
        eval=paths.FINETUNED_EVAL,
    log:
        "logs/{model}/finetune/{target}.eval.log",
    wildcard_constraints:
        target="|".join(re.escape(t) for t in FINETUNE_TARGETS) or "none",
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
        code=stage_code("evaluate"),
    script:
        "../workflow_scripts/evaluate_finetuned.py"


rule finetune_table:
    input:
        finetuned=finetuned_evals,
        ptq=finetuned_ptq_evals,
    output:
        table=report(
            paths.FINETUNE_TABLE,
            caption="../report/finetune_table.rst",
            category="{model}",
        ),
    log:
        "logs/{model}/finetune_table.log",
    localrule: True
    conda:
        "../envs/mpqflow.yaml"
    params:
        code=stage_code("finetune_report"),
    script:
        "../workflow_scripts/finetune_table.py"


rule finetune_plot:
    input:
        table=report(
            paths.FINETUNE_TABLE,
            caption="../report/finetune_table.rst",
            category="{model}",
        ),
    output:
        plot=report(
            paths.plot("finetune"),
            caption="../report/finetune.rst",
            category="{model}",
        ),
    log:
        "logs/{model}/finetune_plot.log",
    localrule: True
    conda:
        "../envs/mpqflow.yaml"
    params:
        plots=config["plots"],
        code=stage_code("finetune_report"),
    script:
        "../workflow_scripts/finetune_plot.py"
