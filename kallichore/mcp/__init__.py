"""`kallichore mcp`: a Model Context Protocol server that runs code in kallichore's kernels.

It speaks MCP on stdio with the official SDK (the optional `mcp` extra), and drives either a
running daemon through `kallichore.client` or a supervisor of its own (`open_supervisor`).
Nothing here is imported by the rest of kallichore: the SDK is needed only by this command.
"""
