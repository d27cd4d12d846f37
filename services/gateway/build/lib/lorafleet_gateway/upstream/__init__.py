"""gRPC clients of the gateway's upstreams: the inference replicas and the trainer."""
