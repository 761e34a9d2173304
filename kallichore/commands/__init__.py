"""The subcommands of `kallichore` that talk to a running daemon: `ls`, `start`, `run`,
`kernelspecs`, `attach` (`kallichore.commands.main`; `kallichore.entry` tells them from the
daemon's flags).

Each subcommand is a client of the daemon's API (`kallichore.client`); where the daemon is, is
`daemon_address`'s business. A refusal or an unreachable daemon is one `Error: ...` line on
stderr and status 1, as the daemon's own usage errors are. This package's top imports nothing,
so that telling a subcommand from the daemon costs nothing.
"""

NAMES = ("ls", "start", "run", "kernelspecs", "attach")
