from mpqflow.io import setup_logging

setup_logging(snakemake.log[0])  # first: an import-time error below lands in the rule's log

from mpqflow.stages.study import study_table  # noqa: E402

study_table(
    list(snakemake.input.uniform),
    list(snakemake.input.evals),
    snakemake.output.table,
    list(snakemake.input.finetuned),
    sanity_paths=list(snakemake.input.sanity),
    sanity_csv=snakemake.output.sanity,
    budgets_path=snakemake.input.budgets,
    latency_path=snakemake.input.get("latency"),  # latency.table, when configured: a latency_ms column
    layers_path=snakemake.input.get("layers"),
)
