from mpqflow.io import setup_logging

setup_logging(snakemake.log[0])  # first: an import-time error below lands in the rule's log

from mpqflow.config import PlotsConfig  # noqa: E402
from mpqflow.stages.study import interaction_heatmap  # noqa: E402

interaction_heatmap(
    snakemake.input.matrix,
    snakemake.input.layers,
    snakemake.output.plot,
    PlotsConfig.from_dict(snakemake.params.plots),
)
