from mpqflow.io import setup_logging

setup_logging(snakemake.log[0])  # first: an import-time error below lands in the rule's log

from mpqflow.config import PlotsConfig  # noqa: E402
from mpqflow.stages.study import study_plots  # noqa: E402

study_plots(
    snakemake.input.table,
    snakemake.input.layers,
    dict(snakemake.output.items()),
    PlotsConfig.from_dict(snakemake.params.plots),
    list(snakemake.input.batches),
    snakemake.params.settings,
)
