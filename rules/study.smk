rule study_table:
    input:
        uniform=uniform_evals,
        evals=decision_evals,
        finetuned=finetuned_evals,
    output:
        table="results/{model}/study.csv",
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
        table="results/{model}/study.csv",
        pooled=heatmap_matrix,
        layers="results/{model}/layers.json",
    output:
        accuracy=report(
            "results/{model}/plots/accuracy_vs_size.png",
            caption="../report/accuracy_vs_size.rst",
            category="{model}",
        ),
        pareto=report(
            "results/{model}/plots/pareto_auc.png",
            caption="../report/pareto_auc.rst",
            category="{model}",
        ),
        sanity=report(
            "results/{model}/plots/estimated_vs_measured.png",
            caption="../report/estimated_vs_measured.rst",
            category="{model}",
        ),
        heatmap=report(
            "results/{model}/plots/interaction_heatmap.png",
            caption="../report/interaction_heatmap.rst",
            category="{model}",
        ),
        bits=report(
            "results/{model}/plots/layer_bits.png",
            caption="../report/layer_bits.rst",
            category="{model}",
        ),
        auc=report(
            "results/{model}/pareto_auc.csv",
            caption="../report/pareto_auc.rst",
            category="{model}",
        ),
    log:
        "logs/{model}/study_plots.log",
    localrule: True
    conda:
        "../envs/mpqflow.yaml"
    params:
        plots=config["plots"],
        code=stage_code("study"),
    script:
        "../workflow_scripts/study_plots.py"
