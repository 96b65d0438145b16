#!/usr/bin/env bash
# The differential test against librbd (differential.sh) on clones: each sequence starts by
# making both twins clones of twin parent chains (depth 1 or 2, with or without deep-flatten),
# and adds flatten, rollback and snapshot removal to the operations (differential.py --clone).
# DIFF_CLONE_SEQS sets the budget (default 8 sequences, about 100 s).
here=$(cd "$(dirname "$0")" && pwd)
exec bash "$here/differential.sh" --clone "$@"
