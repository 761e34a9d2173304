"""Embed the supervisor in a trio program: run code in an ipykernel, interrupt it, restart it.

python examples/embed.py
"""

from __future__ import annotations

import trio

from kallichore import (
    JupyterEvent,
    KernelSession,
    SessionSpec,
    StatusEvent,
    open_supervisor,
    python_kernelspec,
)


async def run_cell(session: KernelSession, code: str, *, interrupt: bool = False) -> None:
    """Execute `code`, printing its output as it arrives, until the kernel is idle again.

    With `interrupt`, interrupt it once it has printed something: an interrupt that comes
    before the kernel runs the code (it says `busy` a little earlier) would be lost.
    """
    print(f">>> {code}")
    with session.events.subscribe(backlog=False) as events:
        msg_id = await session.execute(code)
        while True:
            for event in await events.receive():
                if isinstance(event, JupyterEvent) and event.message.parent_msg_id == msg_id:
                    message = event.message
                    if message.msg_type == "stream":
                        print(message.content["text"], end="")
                        if interrupt:
                            print("(interrupting)")
                            await session.interrupt()
                            interrupt = False
                    elif message.msg_type == "execute_result":
                        print(message.content["data"]["text/plain"])
                    elif message.msg_type == "error":
                        print(f"{message.content['ename']}: {message.content['evalue']}")
                    elif (
                        message.msg_type == "status"
                        and message.content["execution_state"] == "idle"
                    ):
                        return
                elif isinstance(event, StatusEvent) and event.status == "exited":
                    return


async def main() -> None:
    async with open_supervisor() as supervisor:
        spec = SessionSpec.from_kernelspec("python-example", python_kernelspec())
        session = await supervisor.create_session(spec)
        info = await session.start()
        implementation = f"{info['implementation']} {info['implementation_version']}"
        print(f"started {implementation}, pid {session.process_id}")

        await run_cell(session, "print(6*7)")
        await run_cell(session, "secret = 42; secret / 0")
        await run_cell(
            session, "import time; print('sleeping', flush=True); time.sleep(60)", interrupt=True
        )

        await session.restart()
        print(f"restarted, pid {session.process_id}; the state is gone:")
        await run_cell(session, "secret")
    print("supervisor closed: no kernel left running")


if __name__ == "__main__":
    trio.run(main)
