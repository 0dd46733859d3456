from mpqflow.io import setup_logging

setup_logging(snakemake.log[0])  # first: an import-time error below lands in the rule's log

from mpqflow.stages.solve import check_budgets  # noqa: E402

check_budgets(
    snakemake.input.layers,
    list(snakemake.params.budgets),
    snakemake.output.caps,
    latency_path=snakemake.input.get("latency"),  # latency.table, when configured
)
