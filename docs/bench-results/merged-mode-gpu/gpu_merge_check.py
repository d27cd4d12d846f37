"""GPU check of merged mode on vLLM 0.26: in-place merge under CUDA graphs, weight loaders (TP), exact restore.

python3 gpu_merge_check.py --shape 7b|tiny-kv1 --tp N --out DIR
"""
import argparse, json, os, sys, time

import torch
from safetensors.torch import save_file

SHAPES = {
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064),
    "tiny-kv1": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=1, vocab_size=32000),
}


def model_dir(path, shape):
    os.makedirs(path, exist_ok=True)
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "max_position_embeddings": 4096,
           "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
           "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, "use_sliding_window": False,
           "sliding_window": 4096, "max_window_layers": 64, "attention_dropout": 0.0, "initializer_range": 0.02,
           **SHAPES[shape]}
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    json.dump({"bos_token_id": 1, "eos_token_id": 2}, open(os.path.join(path, "generation_config.json"), "w"))
    return cfg


def adapter(path, cfg, rank, b_std, seed=0):
    os.makedirs(path, exist_ok=True)
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for layer in range(cfg["num_hidden_layers"]):
        for m, (o, n) in shapes.items():
            pre = f"base_model.model.model.layers.{layer}.{m}"
            sd[pre + ".lora_A.weight"] = (torch.randn(rank, n, generator=g) / n ** 0.5).bfloat16()
            sd[pre + ".lora_B.weight"] = (torch.randn(o, rank, generator=g) * b_std).bfloat16()
    save_file(sd, os.path.join(path, "adapter_model.safetensors"))
    json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules":
               ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "bias": "none"},
              open(os.path.join(path, "adapter_config.json"), "w"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny-kv1")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--b-std", type=float, default=0.05)
    ap.add_argument("--out", default="/tmp/out")
    ap.add_argument("--hang-s", type=float, default=150)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--compile", action="store_true", help="torch.compile + piecewise graphs (vLLM's default)")
    args = ap.parse_args()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    t0 = time.monotonic()
    log = lambda *a: print(f"[{time.monotonic() - t0:6.1f}s]", *a, flush=True)
    cfg = model_dir("/tmp/mm-model", args.shape)
    adapter("/tmp/mm-adapter", cfg, args.rank, args.b_std)
    adapter("/tmp/mm-adapter-b", cfg, args.rank, args.b_std, seed=1)
    llm = LLM(model="/tmp/mm-model", load_format="dummy", skip_tokenizer_init=True, dtype=args.dtype,
              tensor_parallel_size=args.tp, max_model_len=512, max_num_seqs=16, gpu_memory_utilization=0.85,
              enable_lora=True, max_loras=1, max_lora_rank=args.rank, max_cpu_loras=2,
              worker_extension_cls="merge_check_ext.CheckExtension",
              **({} if args.compile else {"compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                                                  "cudagraph_capture_sizes": [1, 2, 4, 8, 16]}}))
    log("engine up")
    import faulthandler
    faulthandler.dump_traceback_later(args.hang_s, exit=True)
    res = {"shape": args.shape, "tp": args.tp, "rank": args.rank, "dtype": args.dtype}
    res["worker_pids"] = llm.collective_rpc("lf_arm", args=(args.hang_s - 20,))
    log("armed", res["worker_pids"])
    res["randomized"] = llm.collective_rpc("lf_randomize", args=(7,))
    log("randomized")
    llm.reset_prefix_cache()
    g = torch.Generator().manual_seed(1)
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(10, cfg["vocab_size"] - 10, (48,), generator=g).tolist())
               for _ in range(8)]
    sp = SamplingParams(max_tokens=32, temperature=0, logprobs=1, detokenize=False)

    def gen(lora=None):
        outs = llm.generate(prompts, sp, lora_request=lora, use_tqdm=False)
        toks = [list(o.outputs[0].token_ids) for o in outs]
        lps = [[d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs]
        return toks, lps

    sp1 = SamplingParams(max_tokens=1, temperature=0, logprobs=20, detokenize=False)

    def first(lora=None):
        outs = llm.generate(prompts, sp1, lora_request=lora, use_tqdm=False)
        return [{t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()} for o in outs]

    def fdiff(a, b):
        top_same = sum(max(x, key=x.get) == max(y, key=y.get) for x, y in zip(a, b))
        common = [abs(x[t] - y[t]) for x, y in zip(a, b) for t in x if t in y]
        if not common:
            return {"top1_same": top_same, "common_top20": 0}
        return {"top1_same": top_same, "max_lp_diff": max(common), "mean_lp_diff": sum(common) / len(common)}

    lora_probe = LoRARequest("a", 1, "/tmp/mm-adapter")
    f_base, f_lora = first(), first(lora_probe)
    res["first_token"] = {"base_vs_base": fdiff(f_base, first()), "lora_vs_lora": fdiff(f_lora, first(lora_probe)),
                          "base_vs_lora": fdiff(f_base, f_lora)}
    base_t, base_lp = gen()
    lora_req = LoRARequest("a", 1, "/tmp/mm-adapter")
    lora_t, lora_lp = gen(lora_req)
    log("generated base and lora")
    res["lora_repeat_equal"] = gen(lora_req) == (lora_t, lora_lp)
    res["base_repeat_equal"] = gen() == (base_t, base_lp)
    res["lora_changes_output"] = sum(a != b for a, b in zip(base_t, lora_t))
    ptr_before = llm.collective_rpc("lf_pointers")
    for attempt in ("first", "second"):
        t = time.monotonic()
        r = llm.collective_rpc("lorafleet_merge_adapter", args=("/tmp/mm-adapter", "a@v1"))
        res[f"merge_{attempt}_s"] = time.monotonic() - t
        res[f"merge_{attempt}_worker"] = r
        llm.reset_prefix_cache()
        res[f"check_{attempt}"] = llm.collective_rpc("lf_check_merged", args=("/tmp/mm-adapter",))
        res["pointers_unchanged"] = llm.collective_rpc("lf_pointers") == ptr_before
        res["first_token"][f"merged_vs_lora_{attempt}"] = fdiff(first(), f_lora)
        m_t, m_lp = gen()
        same = [sum(x == y for x, y in zip(a, b)) for a, b in zip(m_t, lora_t)]
        first_div = [next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(m_t, lora_t)]
        res[f"merged_vs_lora_{attempt}"] = {"identical_sequences": sum(a == b for a, b in zip(m_t, lora_t)),
                                            "tokens_equal": same, "first_divergence": first_div,
                                            "lp0_absdiff": max(abs(a[0] - b[0]) for a, b in zip(m_lp, lora_lp)),
                                            "differs_from_base": sum(a != b for a, b in zip(m_t, base_t))}
        t = time.monotonic()
        r = llm.collective_rpc("lorafleet_restore_base")
        res[f"restore_{attempt}_s"] = time.monotonic() - t
        llm.reset_prefix_cache()
        res[f"base_check_{attempt}"] = llm.collective_rpc("lf_check_base")
        res["first_token"][f"restored_vs_base_{attempt}"] = fdiff(first(), f_base)
        b_t, b_lp = gen()
        res[f"restored_equals_base_{attempt}"] = {"tokens": b_t == base_t, "logprobs": b_lp == base_lp}
        log(attempt, json.dumps({k: v for k, v in res.items() if attempt in k}, default=str)[:1500])
    llm.collective_rpc("lorafleet_merge_adapter", args=("/tmp/mm-adapter", "a@v1"))
    t = time.monotonic()
    llm.collective_rpc("lorafleet_merge_adapter", args=("/tmp/mm-adapter-b", "b@v1"))
    res["switch_a_to_b_s"] = time.monotonic() - t
    res["check_b"] = llm.collective_rpc("lf_check_merged", args=("/tmp/mm-adapter-b",))
    t = time.monotonic()
    llm.collective_rpc("lorafleet_restore_base")
    res["restore_from_b_s"] = time.monotonic() - t
    res["base_check_after_b"] = llm.collective_rpc("lf_check_base")
    faulthandler.cancel_dump_traceback_later()
    res["lora_after_restore_equal"] = gen(lora_req)[0] == lora_t
    os.makedirs(args.out, exist_ok=True)
    json.dump(res, open(os.path.join(args.out, f"merge-{args.shape}-tp{args.tp}-{args.dtype}.json"), "w"), indent=1, default=str)
    print(json.dumps(res, indent=1, default=str)[:6000])


if __name__ == "__main__":
    main()
