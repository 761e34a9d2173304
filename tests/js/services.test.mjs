// @jupyterlab/services, unchanged, against a server of the Jupyter Server kernels API: what
// JupyterLab does with a kernel, once with the v1 kernel WebSocket subprotocol (the client's
// default) and once with a WebSocket that offers none (the legacy protocol).
//
// Run by tests/jupyter/test_jupyterlab_services.py, which starts the server and passes
// JUPYTER_SERVER_URL and JUPYTER_TOKEN.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import services from '@jupyterlab/services';
import WebSocket from 'ws';

const { KernelManager, KernelSpecManager, ServerConnection, SessionManager } = services;

const baseUrl = process.env.JUPYTER_SERVER_URL;
const token = process.env.JUPYTER_TOKEN ?? '';
const KERNEL_NAME = 'python3';
const V1 = 'v1.kernel.websocket.jupyter.org';
assert.ok(baseUrl, 'JUPYTER_SERVER_URL is not set');

// The kernel side of the comm test: a target that answers each message with its data and
// its buffers, each reversed, so that both directions are checked byte for byte.
const ECHO_TARGET = `
def _echo_target(comm, open_msg):
    @comm.on_msg
    def _echo(msg):
        buffers = [bytes(b)[::-1] for b in msg['buffers']]
        comm.send({'echo': msg['content']['data'], 'sizes': [len(b) for b in buffers]},
                  buffers=buffers)
get_ipython().kernel.comm_manager.register_target('echo', _echo_target)
`;

// Every WebSocket the client opens, to read the subprotocol the server chose.
const opened = [];

class RecordingWebSocket extends WebSocket {
  constructor(url, protocols) {
    super(url, protocols);
    opened.push(this);
  }
}

// What an older client does: offer no subprotocol at all.
class NoSubprotocolWebSocket extends RecordingWebSocket {
  constructor(url, _protocols) {
    super(url, []);
  }
}

function bytesOf(buffer) {
  const view = ArrayBuffer.isView(buffer)
    ? new Uint8Array(buffer.buffer, buffer.byteOffset, buffer.byteLength)
    : new Uint8Array(buffer);
  return Array.from(view);
}

// Run `code`; its reply and the iopub messages it caused.
async function execute(kernel, code, onIOPub = () => {}) {
  const iopub = [];
  const future = kernel.requestExecute({ code });
  future.onIOPub = (msg) => {
    iopub.push(msg);
    onIOPub(msg);
  };
  const reply = await future.done;
  return { reply, iopub };
}

function ofType(iopub, type) {
  return iopub.filter((msg) => msg.header.msg_type === type);
}

async function status(path) {
  const response = await fetch(new URL(path, baseUrl), {
    headers: token ? { Authorization: `token ${token}` } : {},
  });
  return response.status;
}

for (const [protocol, WebSocketClass] of [
  [V1, RecordingWebSocket],
  ['', NoSubprotocolWebSocket],
]) {
  describe(`protocol '${protocol || 'legacy'}'`, () => {
    const serverSettings = ServerConnection.makeSettings({
      baseUrl,
      token,
      WebSocket: WebSocketClass,
    });
    const kernels = new KernelManager({ serverSettings });
    let kernel;

    before(async () => {
      await kernels.ready;
    });
    after(() => {
      kernels.dispose();
    });

    test('kernelspecs list the default kernel', async () => {
      const specs = new KernelSpecManager({ serverSettings });
      await specs.ready;
      assert.equal(specs.specs.default, KERNEL_NAME);
      assert.equal(specs.specs.kernelspecs[KERNEL_NAME].language, 'python');
      specs.dispose();
    });

    test('start a kernel and talk to it over the expected subprotocol', async () => {
      kernel = await kernels.startNew({ name: KERNEL_NAME });
      const info = await kernel.info;
      assert.equal(info.language_info.name, 'python');
      assert.equal(opened.at(-1).protocol, protocol);
    });

    test('execute 6*7 gives the execute_result 42', async () => {
      const { reply, iopub } = await execute(kernel, '6*7');
      assert.equal(reply.content.status, 'ok');
      const results = ofType(iopub, 'execute_result');
      assert.deepEqual(
        results.map((msg) => msg.content.data['text/plain']),
        ['42'],
      );
    });

    test('a comm carries binary buffers both ways', async () => {
      assert.equal((await execute(kernel, ECHO_TARGET)).reply.content.status, 'ok');
      const comm = kernel.createComm('echo');
      const answered = new Promise((resolve) => {
        comm.onMsg = resolve;
      });
      await comm.open({}).done;
      const sent = [new Uint8Array([0, 1, 2, 255]).buffer, new Uint8Array([7, 8, 9, 10, 11])];
      comm.send({ hello: 'world' }, undefined, sent);
      const answer = await answered;
      assert.deepEqual(answer.content.data, { echo: { hello: 'world' }, sizes: [4, 5] });
      assert.deepEqual(answer.buffers.map(bytesOf), [
        [255, 2, 1, 0],
        [11, 10, 9, 8, 7],
      ]);
      comm.close();
    });

    test('interrupt stops time.sleep(60)', async () => {
      let running;
      const started = new Promise((resolve) => {
        running = resolve;
      });
      // Interrupted once its own code runs (a SIGINT while the kernel is still setting up the
      // execution could lose the reply).
      const code = "import time; print('sleeping', flush=True); time.sleep(60)";
      const done = execute(kernel, code, (msg) => {
        if (msg.header.msg_type === 'stream') running();
      });
      await started;
      await kernel.interrupt();
      const { reply } = await done;
      assert.equal(reply.content.status, 'error');
      assert.equal(reply.content.ename, 'KeyboardInterrupt');
    });

    test('restart clears a variable', async () => {
      assert.equal((await execute(kernel, 'x = 1')).reply.content.status, 'ok');
      await kernel.restart();
      await kernel.info;
      const { reply } = await execute(kernel, 'x');
      assert.equal(reply.content.status, 'error');
      assert.equal(reply.content.ename, 'NameError');
    });

    test('shutdown removes the kernel', async () => {
      const id = kernel.id;
      await kernel.shutdown();
      assert.equal(kernel.status, 'dead');
      assert.equal(await status(`api/kernels/${id}`), 404);
    });

    test('SessionManager creates and deletes a session with its kernel', async () => {
      const sessions = new SessionManager({ kernelManager: kernels, serverSettings });
      await sessions.ready;
      const session = await sessions.startNew({
        path: `clients-${protocol || 'legacy'}.ipynb`,
        name: 'clients',
        type: 'notebook',
        kernel: { name: KERNEL_NAME },
      });
      const kernelId = session.kernel.id;
      const { reply, iopub } = await execute(session.kernel, 'print(6*7)');
      assert.equal(reply.content.status, 'ok');
      assert.equal(
        ofType(iopub, 'stream')
          .map((msg) => msg.content.text)
          .join(''),
        '42\n',
      );
      await sessions.refreshRunning();
      assert.ok(Array.from(sessions.running()).some((model) => model.id === session.id));
      await sessions.shutdown(session.id);
      assert.equal(await status(`api/sessions/${session.id}`), 404);
      assert.equal(await status(`api/kernels/${kernelId}`), 404);
      sessions.dispose();
    });
  });
}
