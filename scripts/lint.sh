#!/usr/bin/env bash
# Static checks that CI runs before the tests: ruff (lint and format), snakefmt, snakemake --lint.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
snakefmt --check Snakefile rules/
# --lint parses the workflow with the embedded default config (no job runs).
snakemake --lint --quiet
mkdocs build --strict --quiet -d "$(mktemp -d)"  # the docs: a broken link or anchor fails (mkdocs.yml)
echo "lint: clean"
