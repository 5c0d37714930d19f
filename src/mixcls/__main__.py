"""`python -m mixcls …` (what torchrun launches) is the same as the `mixcls` command."""

from mixcls.cli import run

run()
