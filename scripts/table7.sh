#!/usr/bin/env bash
# Table 7 of the paper: its selections and trainings (see scripts/tables.py for the grid and the environment).
exec "${PYTHON:-python}" "$(dirname "$0")/tables.py" 7 "$@"
