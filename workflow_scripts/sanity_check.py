from mpqflow.io import setup_logging

setup_logging(snakemake.log[0])  # first: an import-time error below lands in the rule's log

from mpqflow.config import SolverConfig  # noqa: E402
from mpqflow.stages.solve import sanity_checks  # noqa: E402

sanity_checks(
    snakemake.input.layers,
    list(snakemake.input.pooled),
    snakemake.wildcards.method,
    SolverConfig.from_dict(snakemake.params.solver),
    snakemake.output.result,
    snakemake.params.settings,
    latency_path=snakemake.input.get("latency"),  # latency.table, when configured
)
