"""`lorafleet`: the command-line client of a LoRA Fleet gateway. It uses the gateway's HTTP API only
(no gRPC, no store access), so it works against any deployment a key can reach."""
