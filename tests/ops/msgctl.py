"""msgctl for the operations tests: its real main() in a thread against a control socket."""

from __future__ import annotations

import asyncio
import json
import time

from msgd.cli import main as cli
from tests.harness import ChildServer


class Msgctl:
    """msgctl's real main() in a thread, against the control socket at `path`."""

    def __init__(self, path, capsys) -> None:
        self.path = path
        self.capsys = capsys

    async def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = await asyncio.to_thread(cli.main, [*argv, "--socket", str(self.path)])
        out, err = self.capsys.readouterr()
        return code, out, err

    async def json(self, *argv: str) -> tuple[int, object]:
        code, out, _err = await self(*argv, "--json")
        return code, json.loads(out)

    async def ok(self, *argv: str) -> str:
        code, out, err = await self(*argv)
        assert code == 0, err
        return out


async def control_ready(child: ChildServer, starts: int = 1) -> None:
    """Wait until the child's control socket listens: it is bound after the gateway listener
    (which ChildServer.start waits for), and the log says when (`starts`: which start)."""
    deadline = time.monotonic() + 15
    while child.log_text().count("event=control.listening") < starts:
        assert time.monotonic() < deadline, f"control socket not ready: {child.log_text()[-1500:]}"
        await asyncio.sleep(0.02)  # polling the log for a condition, bounded
