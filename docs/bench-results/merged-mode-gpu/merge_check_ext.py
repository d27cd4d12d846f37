"""Test-only worker extension: MergeWorkerExtension plus checks that run inside vLLM's workers (GPU check)."""
from pathlib import Path

import torch

from lorafleet_inference.merge_worker import MergeWorkerExtension, plan_merge, read_adapter


def _expected(layer, base, parts, device):
    expected = base.to(device, torch.float32).clone()
    rank = layer.tp_rank
    cls = {c.__name__ for c in type(layer).__mro__}
    for pair, shard in parts:
        delta = pair.delta(device)
        if shard is None:
            if "RowParallelLinear" in cls:
                k = layer.input_size_per_partition
                expected += delta[:, rank * k:(rank + 1) * k]
            else:
                n = expected.shape[0]
                expected += delta[rank * n:(rank + 1) * n]
        elif "QKVParallelLinear" in cls:
            q = layer.num_heads * layer.head_size
            kv = layer.num_kv_heads * layer.head_size
            vv = layer.num_kv_heads * getattr(layer, "v_head_size", layer.head_size)
            kv_rank = rank // layer.num_kv_head_replicas
            off, size, src = {"q": (0, q, rank), "k": (q, kv, kv_rank), "v": (q + kv, vv, kv_rank)}[shard]
            expected[off:off + size] += delta[src * size:(src + 1) * size]
        else:
            sizes = list(layer.output_partition_sizes)
            off, size = sum(sizes[:shard]), sizes[shard]
            expected[off:off + size] += delta[rank * size:(rank + 1) * size]
    return expected.to(base.dtype)


class CheckExtension(MergeWorkerExtension):
    def lf_arm(self, seconds: float) -> int:
        import faulthandler, os, sys
        faulthandler.dump_traceback_later(seconds, exit=False, file=sys.stderr)
        return os.getpid()

    def lf_randomize(self, seed: int) -> int:
        model = self.model_runner.get_model()
        count = 0
        for i, (name, p) in enumerate(sorted(model.named_parameters())):
            if p.numel() == 0 or "lora" in name:
                continue
            g = torch.Generator(device=p.device).manual_seed(seed * 100003 + i)
            if "norm" in name:
                p.data.fill_(1.0)
            else:
                p.data.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32) * 0.02)
            count += 1
        return count

    def lf_pointers(self) -> dict:
        model = self.model_runner.get_model()
        return {n: p.data_ptr() for n, p in model.named_parameters()}

    def lf_check_merged(self, adapter_dir: str) -> dict:
        merger = self._lorafleet_merger()
        placements = plan_merge(merger.model, read_adapter(Path(adapter_dir)))
        bad, worst = [], 0.0
        for pl in placements:
            layer = pl.layer
            want = _expected(layer, merger._base[pl.name], pl.parts, layer.weight.device)
            got = layer.weight.data
            if not torch.equal(got, want):
                bad.append(pl.name)
                worst = max(worst, float((got.float() - want.float()).abs().max()))
        return {"layers": len(placements), "mismatched": bad[:5], "n_mismatched": len(bad), "worst": worst,
                "types": sorted({type(pl.layer).__name__ for pl in placements}),
                "loaders": sorted({getattr(pl.layer.weight.weight_loader, "__name__", "?") for pl in placements})}

    def lf_check_base(self) -> dict:
        merger = self._lorafleet_merger()
        bad = [n for n, base in merger._base.items()
               if not torch.equal(merger._layers[n].weight.data.cpu(), base)]
        return {"layers": len(merger._base), "differ": len(bad)}
