# The gradient-quantization study (ALQ / AMQ vs QSGD / NUQSGD vs float32): `snakemake gradquant`.
# Not part of `all`: 1 + 6 x 3 data-parallel trainings per model.


rule gradquant_run:
    output:
        run=paths.GRADQUANT_RUN,
    log:
        "logs/{model}/gradquant/{run}.log",
    wildcard_constraints:
        run="|".join(re.escape(r) for r in GRADQUANT.runs()),
    conda:
        "../envs/mpqflow.yaml"
    threads: gradquant_threads
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gradquant_gpus,
    params:
        model=model_config,
        seed=config["seed"],
        evaluation=config["evaluation"],
        # the run's own settings; the methods / bits / models lists are not params: adding a run
        # reruns no other
        spec=gradquant_run_spec,
        code=stage_code("gradquant"),
        # epoch checkpoints: outside the outputs, so an incomplete job's cleanup keeps them to resume
        state_dir=paths.GRADQUANT_STATE,
    script:
        "../workflow_scripts/gradquant_run.py"


rule gradquant_study:
    input:
        runs=expand(paths.GRADQUANT_RUN, run=GRADQUANT.runs(), allow_missing=True),
    output:
        table=report(
            paths.GRADQUANT_TABLE,
            caption="../report/gradquant_table.rst",
            category="{model}",
        ),
        variance=paths.GRADQUANT_VARIANCE_TABLE,
        report=paths.GRADQUANT_REPORT,
        variance_plot=report(
            paths.plot("gradquant_variance"),
            caption="../report/gradquant_variance.rst",
            category="{model}",
        ),
        accuracy_plot=report(
            paths.plot("gradquant_accuracy"),
            caption="../report/gradquant_accuracy.rst",
            category="{model}",
        ),
    log:
        "logs/{model}/gradquant_study.log",
    localrule: True
    conda:
        "../envs/mpqflow.yaml"
    params:
        plots=config["plots"],
        code=stage_code("gradquant_report"),
    script:
        "../workflow_scripts/gradquant_study.py"


rule gradquant:
    input:
        expand(GRADQUANT_OUTPUTS, model=GRADQUANT.study_models(MODELS)),
    localrule: True
