"""A picklable sweep-runner factory for the executor tests (imports nothing heavy: workers start fast)."""

from __future__ import annotations

import os


class SquareRunner:
    def __call__(self):
        def run(payload):
            if payload == "boom":
                raise ValueError("planted failure")
            return {"y": payload * payload, "pid": os.getpid()}

        return run
