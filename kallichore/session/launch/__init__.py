"""Launchers: what starts a session's kernel, and where.

`local` runs it as our child (kallichore.session.kernel_run does that itself); `ssh` and
`slurm` run it on another machine through `remote_shim`, which registers its ports with us
(JEP 66) and relays its output, signals and exit (`remote`). `options` parses the launcher
block that names one.
"""
