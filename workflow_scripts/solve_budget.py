from mpqflow.io import setup_logging

setup_logging(snakemake.log[0])  # first: an import-time error below lands in the rule's log

from mpqflow.config import SolverConfig  # noqa: E402
from mpqflow.stages.solve import solve_budget  # noqa: E402

solve_budget(
    snakemake.input.layers,
    snakemake.input.pooled,
    snakemake.wildcards.method,
    snakemake.wildcards.budget,
    SolverConfig.from_dict(snakemake.params.solver),
    snakemake.output.decision,
    snakemake.params.settings,
    latency_path=snakemake.input.get("latency"),  # latency.table, when configured
)
