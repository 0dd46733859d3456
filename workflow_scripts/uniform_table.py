from mpqflow.io import setup_logging

setup_logging(snakemake.log[0])  # first: an import-time error below lands in the rule's log

from mpqflow.stages.uniform_report import uniform_table  # noqa: E402

uniform_table(list(snakemake.input), snakemake.output.table)
