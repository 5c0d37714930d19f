"""`python -m mixcls …` (what torchrun launches) is the same as the `mixcls` command."""

import sys

from mixcls.cli import main

sys.exit(main())
