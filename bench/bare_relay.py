"""The least a Python gateway can do: a floor to measure the real gateway against (bench/gateway_cpu.py --bare-relay).

A raw ASGI app on uvicorn (uvloop, httptools, no access log) that relays POST /v1/chat/completions and
/v1/completions with ``stream: true`` to one replica over grpc.aio, as the gateway does on its hot path, and
nothing else: no FastAPI, no authentication, validation, rate limits, routing or metrics. Chat sends the role
event with the first token; then an event per chunk, the usage event if ``stream_options.include_usage`` asks
for it, and ``data: [DONE]``. Not a server to use: a benchmark's reference (bench/gateway_cpu.py,
bench/gateway.py --bare-relay).

    python bench/bare_relay.py --port 8100 --target 127.0.0.1:50051 [--base-model NAME]

With ``--base-model``, a request whose ``model`` is another name runs on the adapter of that store name (the
replica's own names, e.g. ``bench/m0``: no tenant mapping); without it every request runs on the base model.
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


def relay(target: str, base_model: str = "") -> Any:
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
        if scope["path"] in ("/ready", "/health"):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        request = json.loads(body)
        chat = scope["path"] == "/v1/chat/completions"
        model = request.get("model") or ""
        adapter = model if base_model and model != base_model else ""
        sampling = inference_pb2.SamplingParams(
            max_tokens=request.get("max_tokens") or 0, ignore_eos=bool(request.get("ignore_eos"))
        )
        if chat:
            messages = [inference_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in request["messages"]]
            upstream = inference_pb2.GenerateRequest(
                adapter=adapter, chat=inference_pb2.ChatInput(messages=messages), sampling=sampling
            )
        else:
            upstream = inference_pb2.GenerateRequest(adapter=adapter, prompt=request["prompt"], sampling=sampling)
        call = stub.Generate(upstream, timeout=600)
        chunk = await call.read()
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        pending, tokens = ROLE if chat else b"", 0
        while chunk is not grpc.aio.EOF:
            choice = {"index": 0, "delta": {"content": chunk.text}} if chat else {"index": 0, "text": chunk.text}
            pending += b"data: " + json.dumps({"choices": [choice]}, separators=(",", ":")).encode() + b"\n\n"
            await send({"type": "http.response.body", "body": pending, "more_body": True})
            pending, tokens = b"", tokens + chunk.token_count
            chunk = await call.read()
        if (request.get("stream_options") or {}).get("include_usage"):
            usage = {"choices": [], "usage": {"completion_tokens": tokens}}
            pending = b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n"
        await send({"type": "http.response.body", "body": pending + b"data: [DONE]\n\n", "more_body": False})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", required=True, help="the replica, host:port")
    parser.add_argument("--base-model", default="", help="requests naming another model run on that adapter")
    args = parser.parse_args()
    uvicorn.run(
        relay(args.target, args.base_model),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
