"""A stand-in inference replica for benchmarks: the real lorafleet.inference.v1 contract over grpc.aio,
streaming a fixed number of tokens at a fixed pace, so whatever is measured in front of it is not the engine.

    python bench/fake_replica.py --port 0 --tokens 32 --token-delay-ms 20   # prints "ready <port>"
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from lorafleet.inference.v1 import inference_pb2, inference_pb2_grpc


class PacedReplica(inference_pb2_grpc.InferenceServiceServicer):
    """Generate yields ``tokens`` one-token chunks, ``delay_s`` apart; the last carries usage."""

    def __init__(self, tokens: int, delay_s: float) -> None:
        self.tokens = tokens
        self.delay_s = delay_s
        self.running = 0

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        self.running += 1
        try:
            limit = request.sampling.max_tokens or self.tokens
            count = min(self.tokens, limit)
            for i in range(count):
                await asyncio.sleep(self.delay_s)
                chunk = inference_pb2.GenerateChunk(index=0, text=" tok", token_count=1)
                if i == count - 1:
                    chunk.finish_reason = "length" if count < self.tokens else "stop"
                    chunk.usage.prompt_tokens = 8
                    chunk.usage.completion_tokens = count
                yield chunk
        finally:
            self.running -= 1

    async def Stats(self, request: inference_pb2.StatsRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return inference_pb2.StatsResponse(running=self.running, base_model="bench-base")


async def serve(port: int, tokens: int, delay_s: float) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 10_000)])
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(PacedReplica(tokens, delay_s), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


async def main_async(args: argparse.Namespace) -> None:
    server, port = await serve(args.port, args.tokens, args.token_delay_ms / 1000)
    print(f"ready {port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per response")
    parser.add_argument("--token-delay-ms", type=float, default=20.0, help="pause before each token")
    try:
        asyncio.run(main_async(parser.parse_args()))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
