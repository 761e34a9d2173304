"""`python -m kallichore` runs the daemon, exactly as the `kallichore` command does."""

import sys

from kallichore.cli import main

sys.exit(main())
