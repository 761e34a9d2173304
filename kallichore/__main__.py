"""`python -m kallichore` is the `kallichore` command: the daemon, or a subcommand for one."""

import sys

from kallichore.entry import main

sys.exit(main())
