#!/usr/bin/env bash
# Mutation testing of losses, the stages' step and wiring, masks, cache, resume state and checkpoint selection
# (docs/mutation.md). One mutant at a time, niced: a sampled run aims at an hour on 2 idle cores; `slow`, so never part
# of the default suite or CI. Usage: scripts/mutation.sh [GROUP ...] [--report] [--root CHECKOUT]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-python}"
if [[ -x "$here/../.venv/bin/python" && -z "${PYTHON:-}" ]]; then py="$here/../.venv/bin/python"; fi
exec nice -n 10 "$py" "$here/mutation.py" "$@"
