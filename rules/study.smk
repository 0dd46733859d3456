rule study_table:
    input:
        unpack(study_latency),
        uniform=uniform_evals,
        evals=decision_evals,
        finetuned=finetuned_evals,
        sanity=sanity_results,
        budgets=paths.BUDGETS,  # which budgets share a cap (noted in the table)
    output:
        table=report(
            paths.STUDY_TABLE,
            caption="../report/study_table.rst",
            category="{model}",
        ),
        sanity=report(
            paths.SANITY_TABLE,
            caption="../report/sanity.rst",
            category="{model}",
        ),
    log:
        "logs/{model}/study_table.log",
    localrule: True
    conda:
        "../envs/mpqflow.yaml"
    params:
        code=stage_code("study"),
    script:
        "../workflow_scripts/study_table.py"


rule study_plots:
    input:
        table=paths.STUDY_TABLE,
        layers=paths.LAYERS,
        batches=pool_batch_files,
    output:
        accuracy=report(
            paths.plot("accuracy_vs_size"),
            caption="../report/accuracy_vs_size.rst",
            category="{model}",
        ),
        pareto=report(
            paths.plot("pareto_auc"),
            caption="../report/pareto_auc.rst",
            category="{model}",
        ),
        sanity=report(
            paths.plot("estimated_vs_measured"),
            caption="../report/estimated_vs_measured.rst",
            category="{model}",
        ),
        bits=report(
            paths.plot("layer_bits"),
            caption="../report/layer_bits.rst",
            category="{model}",
        ),
        auc=report(
            paths.PARETO_AUC_TABLE,
            caption="../report/pareto_auc.rst",
            category="{model}",
        ),
        calibration=report(
            paths.CALIBRATION_TABLE,
            caption="../report/calibration.rst",
            category="{model}",
        ),
    log:
        "logs/{model}/study_plots.log",
    localrule: True
    conda:
        "../envs/mpqflow.yaml"
    params:
        plots=config["plots"],
        settings=study_method_settings(),
        code=stage_code("study"),
    script:
        "../workflow_scripts/study_plots.py"


# Only with a pairwise method (CLADO): its matrix of the largest first set, drawn.
rule interaction_heatmap:
    input:
        matrix=heatmap_matrix,
        layers=paths.LAYERS,
    output:
        plot=report(
            paths.plot("interaction_heatmap"),
            caption="../report/interaction_heatmap.rst",
            category="{model}",
        ),
    log:
        "logs/{model}/interaction_heatmap.log",
    localrule: True
    conda:
        "../envs/mpqflow.yaml"
    params:
        plots=config["plots"],
        code=stage_code("study"),
    script:
        "../workflow_scripts/interaction_heatmap.py"
