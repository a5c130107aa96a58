"""`python -m biobert ...` is the `biobert` command."""

import sys

from biobert.cli import main

sys.exit(main())
