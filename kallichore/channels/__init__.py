"""The stream between a session's event log and its clients.

`broker` decides which client reads a session's events (one at a time, handed over by
displacement); `kallichore_framing` turns events into the Kallichore API's frames and client
frames into messages (other framings, such as the Jupyter Server's, belong beside it); `websocket`
is the transport, wsproto's connection state driven by a thin trio shell that owns the socket.
The listeners that accept connections live in the daemon (`kallichore.server`).

The hot path, from a kernel's frames to the client's socket, with no task switch when the client
is caught up:

1. `KernelRun._pump` (kallichore.session): the kernel's frames, verified; the header parsed,
   never the content; the resulting events appended to the session's `EventLog`;
2. `EventLog.publish_many` offers them to the caught-up subscriber's sink, `ChannelClient._send_now`
   (`broker`), which builds each frame with `kallichore_framing.encode_event`, the one place a
   channels frame is built, around the kernel's own content bytes;
3. `WebSocket.send_now` (`websocket`) writes the batch with one `data_frames` join and one
   non-blocking write; if the socket would block, the client's forwarding task writes it instead.
"""
