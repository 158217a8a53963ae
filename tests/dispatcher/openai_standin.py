"""
A tiny OpenAI-compatible ``POST /v1/chat/completions`` server for composer tests.

It checks each request the way the real API documents it (bearer key, model,
system + user messages) and records it; ``mode`` picks the answer: ``ok`` echoes
a message built from the intent block, ``error`` answers 500, ``slow`` stalls past
any sane client timeout, ``empty`` answers a choice without content. ``fail_first``
makes the first N requests answer 500 whatever the mode (a flaky provider).
"""

import asyncio
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


@dataclass
class StandIn:
    """The server's state: the answer mode and every request body received."""

    api_key: str = "sk-test"
    mode: str = "ok"
    requests: list[dict[str, Any]] = field(default_factory=list)
    release: asyncio.Event | None = None
    fail_first: int = 0

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def completions(request: Request) -> JSONResponse:
            if request.headers.get("authorization") != f"Bearer {self.api_key}":
                return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
            body = await request.json()
            self.requests.append(body)
            if self.mode == "error" or len(self.requests) <= self.fail_first:
                return JSONResponse({"error": {"message": "overloaded"}}, status_code=500)
            if self.mode == "slow":
                await asyncio.sleep(5)
            if self.mode == "empty":
                return JSONResponse({"choices": [{"index": 0, "message": {"role": "assistant"}}]})
            block = body["messages"][-1]["content"]
            intent = next(
                line.split(": ", 1)[1]
                for line in block.splitlines()
                if line.startswith("Why you're reaching out: ")
            )
            return JSONResponse(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": f" Hey! ({intent}) "},
                        }
                    ],
                }
            )

        return app
