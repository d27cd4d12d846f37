"""What chat and completions share: the request fields, the upstream call, aggregation and SSE."""
