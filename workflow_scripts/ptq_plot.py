from mpqflow.io import setup_logging

setup_logging(snakemake.log[0])  # first: an import-time error below lands in the rule's log

from mpqflow.config import PlotsConfig  # noqa: E402
from mpqflow.stages.ptq_report import plot_ptq_table  # noqa: E402

plot_ptq_table(snakemake.input.table, snakemake.output.plot, PlotsConfig.from_dict(snakemake.params.plots))
