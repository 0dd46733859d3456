from mpqflow.io import setup_logging
from mpqflow.plots import study_plots

setup_logging(snakemake.log[0])
study_plots(snakemake.input.table, snakemake.input.pooled or None, snakemake.input.calibration,
            dict(snakemake.output.items()), snakemake.params.plots)
