from mpqflow.io import setup_logging
from mpqflow.search import solve_budget

setup_logging(snakemake.log[0])
solve_budget(snakemake.input.calibration, snakemake.input.pooled, snakemake.wildcards.method,
             snakemake.wildcards.budget, snakemake.params.solver, snakemake.output.decision)
