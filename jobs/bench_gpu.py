"""GPU training-step benchmark: the trainer's own step (FSDP2, bf16 mixed precision, DPOP loss) on a ~1B Llama
with random weights, per scoring variant. Needs only torch and transformers (no Ray, no vLLM), so it runs on any
GPU machine:

    python jobs/bench_gpu.py                       # one GPU
    torchrun --nproc-per-node 8 jobs/bench_gpu.py  # FSDP2 over 8 GPUs
    python jobs/bench_gpu.py --tiny --device cpu   # a smoke run of the same code on CPU (the test suite's)

Variants (the same pairs, the same step):
  full_logits  right-padded rows and the model's full (rows, length, vocabulary) logits, then log softmax: the
               plain computation, as TRL's DPOTrainer does it;
  padded       the same rows, the output head only on completion positions, in chunks (pipeline.logprobs);
  packed       prompt + chosen + rejected as one run of tokens (prefix sharing), packed rows, chunked head: what
               `train.layout: packed` runs.
Figures per variant, written to jobs/benchmarks/gpu.json: seconds per optimizer step, pair tokens/s per GPU (each
pair counted as prompt + chosen + prompt + rejected, the same work whatever the layout), peak allocated memory,
and MFU:

    MFU = model FLOPs per second per GPU / peak dense bf16 FLOP/s of the GPU (989 TFLOP/s for H100 and H200 SXM)
    model FLOPs per step = Σ_pairs [ 6 · N · T_pair + 6 · d · V · C_pair + 12 · L · d · Σ_seq len² / 2 ]

with N the non-embedding parameters, T_pair = prompt + chosen + prompt + rejected tokens, C_pair the completion
tokens (where log-probs are needed), d the hidden size, V the vocabulary, L the layers and the attention term
counted causally (half of each sequence's square), forward and backward (PaLM's appendix B). The same model FLOPs
are credited to every variant, so MFU compares them directly: work a variant skips is not counted as useful.
"""
import argparse
import json
import os
import platform
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def llama_config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    # Llama-3.2-1B's shape: 1.24B parameters, 0.97B of them outside the (tied) embedding.
    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                       max_position_embeddings=4096, rope_theta=500000.0)


def synthetic_pairs(count: int, prompt_len: int, completion_len: int, vocab: int, seed: int) -> list[dict]:
    """Pairs of varied lengths (between half and all of the given ones), as real data is."""
    import torch

    g = torch.Generator().manual_seed(seed)
    length = lambda top: int(torch.randint(top // 2, top + 1, (1,), generator=g))  # noqa: E731
    tokens = lambda n: torch.randint(1, vocab, (n,), generator=g).tolist()  # noqa: E731
    return [{"prompt": tokens(length(prompt_len)), "chosen": tokens(length(completion_len)),
             "rejected": tokens(length(completion_len))} for _ in range(count)]


def model_flops(pairs: list[dict], config) -> float:
    d, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * config.head_dim
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * config.intermediate_size  # q, o; k, v; gate, up, down
    n = L * per_layer
    total = 0.0
    for p in pairs:
        lengths = [len(p["prompt"]) + len(p["chosen"]), len(p["prompt"]) + len(p["rejected"])]
        total += 6 * n * sum(lengths) + 6 * d * V * (len(p["chosen"]) + len(p["rejected"]))
        total += 12 * L * d * sum(s * s for s in lengths) / 2
    return total


def run_variant(variant: str, args, config, pairs: list[dict], mesh, device) -> dict:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from pipeline.logprobs import completion_logps, make_batch, pad_groups
    from pipeline.loss import dpop_loss
    from pipeline.train.parallel import parallelize

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parallelize(model, mesh, mixed_precision=args.mixed_precision == "bf16", activation_checkpointing=args.checkpoint)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = pairs[rank::world]
    micro = [mine[i:i + args.micro_batch] for i in range(0, len(mine), args.micro_batch)]

    def logps_of(batch_pairs):
        groups = [(p["prompt"], [p["chosen"], p["rejected"]]) for p in batch_pairs]
        if variant != "full_logits":
            return completion_logps(model, make_batch(groups, 0, variant).to(device)).view(-1, 2)
        batch = pad_groups(groups, 0).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logps = torch.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])
        sums = torch.zeros(batch.num_completions, device=device)
        return sums.index_add(0, batch.owner, logps[batch.predictor, batch.targets]).view(-1, 2)

    def step():
        for i, batch_pairs in enumerate(micro):
            model.set_requires_gradient_sync(i == len(micro) - 1)
            logps = logps_of(batch_pairs)
            ref = torch.zeros_like(logps)
            loss = dpop_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], 0.1, 50.0).losses.sum()
            (loss / len(mine)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    try:
        for _ in range(args.warmup):
            step()
        synchronize()
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        synchronize()
    except torch.OutOfMemoryError:
        del model, optimizer
        torch.cuda.empty_cache()
        return {"variant": variant, "error": "out of memory", "device": name}
    seconds = (time.perf_counter() - started) / args.steps
    pair_tokens = sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in pairs)
    flops = model_flops(pairs, config)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    peak_flops = next((v for k, v in PEAK_BF16.items() if k in name), None)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return {"variant": variant, "seconds_per_step": seconds,
            "pair_tokens_per_second_per_gpu": pair_tokens / seconds / world,
            "model_tflops_per_gpu": flops / seconds / world / 1e12,
            "mfu": flops / seconds / world / peak_flops if peak_flops else None,
            "peak_memory_gib": peak, "device": name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: a smoke run of the same code")
    parser.add_argument("--pairs-per-step", type=int, default=32, help="pairs per optimizer step, all GPUs")
    parser.add_argument("--micro-batch", type=int, default=8, help="pairs per forward on one GPU")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--completion-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mixed-precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--checkpoint", action="store_true", help="activation checkpointing")
    parser.add_argument("--variants", default="full_logits,padded,packed")
    parser.add_argument("--out", default=os.path.join(HERE, "benchmarks", "gpu.json"))
    args = parser.parse_args()

    import sys

    sys.path.insert(0, os.path.dirname(HERE))
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if "RANK" not in os.environ:  # a plain `python` run: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    device = torch.device(args.device, int(os.environ["LOCAL_RANK"])) if args.device == "cuda" \
        else torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    config = llama_config(args.tiny)
    if args.tiny:
        args.prompt_len, args.completion_len = min(args.prompt_len, 32), min(args.completion_len, 32)
    pairs = synthetic_pairs(args.pairs_per_step, args.prompt_len, args.completion_len, config.vocab_size, seed=0)
    results = [run_variant(v, args, config, pairs, mesh, device) for v in args.variants.split(",")]
    if dist.get_rank() == 0:
        figures = {"config": {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                              "num_attention_heads", "num_key_value_heads",
                                                              "vocab_size")},
                   "gpus": dist.get_world_size(), "torch": torch.__version__, "args": vars(args),
                   "variants": results}
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)
        print(f"{'variant':12} {'s/step':>8} {'pair tok/s/GPU':>15} {'TFLOP/s/GPU':>12} {'MFU':>6} {'peak GiB':>9}")
        for r in results:
            if "error" in r:
                print(f"{r['variant']:12} {r['error']}")
                continue
            mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
            peak = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
            print(f"{r['variant']:12} {r['seconds_per_step']:>8.3f} {r['pair_tokens_per_second_per_gpu']:>15.0f} "
                  f"{r['model_tflops_per_gpu']:>12.1f} {mfu:>6} {peak:>9}")
        print(f"wrote {args.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
