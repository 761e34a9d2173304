"""The stream between a session's event log and its clients.

`broker` decides which client reads a session's events (one at a time, handed over by
displacement); `kallichore_framing` turns events into the Kallichore API's frames and client
frames into messages (other framings, such as the Jupyter Server's, belong beside it); `websocket`
is the transport, wsproto's connection state driven by a thin trio shell that owns the socket.
The listeners that accept connections live in the daemon (`kallichore.server`).
"""
