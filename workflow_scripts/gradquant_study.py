from mpqflow.io import setup_logging

setup_logging(snakemake.log[0])  # first: an import-time error below lands in the rule's log

from mpqflow.config import PlotsConfig  # noqa: E402
from mpqflow.stages.gradquant_report import write_gradquant_study  # noqa: E402

write_gradquant_study(list(snakemake.input.runs), dict(snakemake.output), PlotsConfig.from_dict(snakemake.params.plots))
