"""kallichore's benchmark harness: `python -m benchmarks` (or `nox -s bench`).

Every configuration (jupyter_client straight to the kernel, kallichore embedded, kallichore's
daemon over TCP and over its Unix socket, Jupyter Kernel Gateway, jupyter_server) runs the same
ipykernel on loopback; the workloads alternate between them (A B C ... A B C ...) so that the
machine's drift hits all of them alike, and every figure is reported as a ratio to the floor
(jupyter_client) measured in the same run.

Modules: `environment` (temporary homes, the kernelspec, the servers' virtualenv, processes,
a process's CPU time), `wsclient` (what an execution measured; kallichore.client's channels
connections, held open across tasks, for every WebSocket server), `clients` (clients on other
stacks, each in its own process: `client_websockets` and `client_ws.mjs`), `configs` (the
configurations), `workloads`, `stats`, `report` (JSON, Markdown, charts), `cli`.
"""
