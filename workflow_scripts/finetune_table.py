from mpqflow.io import setup_logging

setup_logging(snakemake.log[0])  # first: an import-time error below lands in the rule's log

from mpqflow.stages.finetune_report import finetune_table  # noqa: E402

finetune_table(list(snakemake.input.finetuned), list(snakemake.input.ptq), snakemake.output.table)
