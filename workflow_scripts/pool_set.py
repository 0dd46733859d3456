from mpqflow.io import setup_logging

setup_logging(snakemake.log[0])  # first: an import-time error below lands in the rule's log

from mpqflow.stages.sensitivity import pool_set  # noqa: E402

pool_set(
    list(snakemake.input.batches),
    snakemake.output.pooled,
    int(snakemake.wildcards.n),
    int(snakemake.wildcards.s),
)
