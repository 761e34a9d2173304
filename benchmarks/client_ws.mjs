// A benchmark client on Node's `ws` (the WebSocket library Positron uses), in a process of its
// own: `node client_ws.mjs NODE_MODULES_DIR tcp|unix ADDRESS RESOURCE QUIET_SECONDS`.
//
// It speaks the protocol of benchmarks/clients.py: a line {"ready": true} once connected, then
// for each line {"code": ...} on stdin, one execution (an execute_request, then every frame
// until its execute_reply and iopub idle), timed here around the WebSocket only, answered with
// one line of what it measured. Once the reply is in, QUIET_SECONDS without a message of the
// execution ends it (a lost idle). `ws` is taken from NODE_MODULES_DIR (tests/js's) with its
// defaults.
import { createRequire } from "node:module";
import { randomUUID } from "node:crypto";
import readline from "node:readline";

const [modules, transport, address, resource, quietSeconds] = process.argv.slice(2);
const WebSocket = createRequire(`${modules}/`)("ws");
const quietMs = Number(quietSeconds) * 1000;
const session = randomUUID();

function answer(document) {
  process.stdout.write(`${JSON.stringify(document)}\n`);
}

function executeRequest(code) {
  return {
    header: {
      msg_id: randomUUID(),
      msg_type: "execute_request",
      session,
      username: "",
      date: new Date().toISOString(),
      version: "5.3",
    },
    parent_header: {},
    channel: "shell",
    content: {
      code,
      silent: false,
      store_history: true,
      user_expressions: {},
      allow_stdin: false,
      stop_on_error: true,
    },
    metadata: {},
    buffers: [],
  };
}

const url = transport === "tcp" ? `ws://${address}${resource}` : `ws+unix://${address}:${resource}`;
const websocket = new WebSocket(url);
// The execution under way: its counts and times (process.hrtime.bigint(), ns).
let current = null;

function finish() {
  const execution = current;
  current = null;
  clearTimeout(execution.quiet);
  answer({
    seconds: Number(execution.last - execution.started) / 1e9,
    iopub_messages: execution.iopubMessages,
    stream_bytes: execution.streamBytes,
    complete: execution.idle,
  });
}

websocket.on("message", (data) => {
  // Every frame is decoded, as a client of the channels must; frames of kind `kernel` are the
  // supervisor's events.
  const frame = JSON.parse(data.toString());
  const execution = current;
  if (execution === null || frame.kind === "kernel") return;
  if (frame.parent_header?.msg_id !== execution.msgId) return;
  execution.last = process.hrtime.bigint();
  const type = frame.header.msg_type;
  if (frame.channel === "iopub") {
    execution.iopubMessages += 1;
    if (type === "stream") execution.streamBytes += frame.content.text.length;
    else if (type === "status" && frame.content.execution_state === "idle") execution.idle = true;
  } else if (type.endsWith("_reply")) {
    execution.replied = true;
  }
  if (execution.replied && execution.idle) {
    finish();
  } else if (execution.replied) {
    clearTimeout(execution.quiet);
    execution.quiet = setTimeout(finish, quietMs);
  }
});

websocket.on("open", () => {
  answer({ ready: true });
  readline.createInterface({ input: process.stdin }).on("line", (line) => {
    const request = executeRequest(JSON.parse(line).code);
    const started = process.hrtime.bigint();
    current = {
      msgId: request.header.msg_id,
      started,
      last: started,
      iopubMessages: 0,
      streamBytes: 0,
      replied: false,
      idle: false,
      quiet: undefined,
    };
    websocket.send(JSON.stringify(request));
  });
});

for (const event of ["error", "close"]) {
  websocket.on(event, (detail) => {
    answer({ error: `the WebSocket ${event}: ${detail}` });
    process.exit(1);
  });
}
