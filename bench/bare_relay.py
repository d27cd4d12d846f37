"""The least a Python gateway can do: a floor to measure the real gateway against (bench/gateway_cpu.py --bare-relay).

A raw ASGI app on uvicorn (uvloop, httptools, no access log) that relays POST /v1/chat/completions with
``stream: true`` to one replica over grpc.aio, as the gateway does on its hot path, and nothing else: no
FastAPI, no authentication, validation, rate limits, routing or metrics. It sends the role event with the
first token, then an event per chunk, then ``data: [DONE]``. Not a server to use: a benchmark's reference.

    python bench/bare_relay.py --port 8100 --target 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import grpc
import uvicorn

from lorafleet.inference.v1 import inference_pb2, inference_pb2_grpc

ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8")]


def relay(target: str) -> Any:
    stub: Any = None

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal stub
        if scope["type"] == "lifespan":
            await receive()  # lifespan.startup
            stub = inference_pb2_grpc.InferenceServiceStub(grpc.aio.insecure_channel(target))
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/ready":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        request = json.loads(body)
        call = stub.Generate(
            inference_pb2.GenerateRequest(
                chat=inference_pb2.ChatInput(
                    messages=[
                        inference_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in request["messages"]
                    ]
                ),
                sampling=inference_pb2.SamplingParams(max_tokens=request.get("max_tokens") or 0),
            ),
            timeout=600,
        )
        chunk = await call.read()
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        pending = ROLE
        while chunk is not grpc.aio.EOF:
            event = {"choices": [{"index": 0, "delta": {"content": chunk.text}}]}
            pending += b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
            await send({"type": "http.response.body", "body": pending, "more_body": True})
            pending = b""
            chunk = await call.read()
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", required=True, help="the replica, host:port")
    args = parser.parse_args()
    uvicorn.run(
        relay(args.target),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
