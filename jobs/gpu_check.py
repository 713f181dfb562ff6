"""The GPU check: what only a GPU can measure, in one run of under 8 minutes on one GPU with nothing installed but
torch, transformers and their own dependencies (no Ray, vLLM, pyarrow or pydantic: the trainer's model code,
pipeline.logprobs, pipeline.loss and pipeline.train.parallel, needs none of them).

    python jobs/gpu_check.py --out OUT/gpu_check.json          # one GPU
    python jobs/gpu_check.py --tiny --device cpu --out X.json  # the same code on tiny shapes (the test suite's)

1. `step`: jobs/bench_gpu.py's three scoring variants (full logits, padded, packed) on Llama-3.2-1B's shape, bf16
   mixed precision: seconds per step, pair tokens/s, MFU, peak memory.
2. `bf16_parity`: SmolLM2-135M's shape, first trained for a few hundred steps on synthetic text so that its
   predictions are confident (random weights give near-uniform logits, which hide rounding). Per pair, the chosen
   log-prob of the trainer's bf16 policy (load_policy with FSDP2 mixed precision, packed micro-batches of 2 pairs)
   against the reference stage's transformers scoring (micro-batches of 4 pairs, shortest first) in fp32 and in
   bf16: the gaps, and the share of pairs `dpop/penalty_active` would count at step 1 at the default thresholds.
3. `sharded_load_save`: a Llama-3-8B-shape model (random bf16 weights, 16 GB of safetensors) loaded by
   `load_policy` onto one GPU (fp32 master weights) and saved by `save_policy` in bf16: seconds, peak GPU memory,
   the host's peak resident memory in each, and every saved tensor equal to the one written.

Each part's figures are written to the JSON as soon as it ends, so a run cut short keeps what it measured.
"""
import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the pipeline package, and bench_gpu / bench_bf16_parity beside this

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
                    max_position_embeddings=8192, rms_norm_eps=1e-5)
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0,
                 max_position_embeddings=8192, rms_norm_eps=1e-5)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)


def peak_host_rss_reset() -> None:
    """Start a new peak of this process's resident memory (Linux: VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_host_rss_gib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20


def gpu_peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def gpu_peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def tiny_tokenizer(folder: str):
    """A word-level tokenizer saved beside a model: save_policy writes the tokenizer too, and nothing is downloaded."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                        unk_token="<unk>", pad_token="<unk>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def step(args, device, mesh) -> dict:
    import bench_gpu

    config = bench_gpu.llama_config(args.tiny)
    options = SimpleNamespace(pairs_per_step=32, micro_batch=8, prompt_len=32 if args.tiny else 256,
                              completion_len=32 if args.tiny else 256, steps=1 if args.tiny else 5,
                              warmup=0 if args.tiny else 2, mixed_precision="bf16", checkpoint=False)
    pairs = bench_gpu.synthetic_pairs(options.pairs_per_step, options.prompt_len, options.completion_len,
                                      config.vocab_size, seed=0)
    return {"model": "tiny" if args.tiny else "Llama-3.2-1B shape", "settings": vars(options),
            "variants": [bench_gpu.run_variant(v, options, config, pairs, mesh, device)
                         for v in ("full_logits", "padded", "packed")]}


def markov_tokens(count: int, length: int, vocab: int, seed: int, successors: int = 4) -> list[list[int]]:
    """Sequences from a fixed random chain in which each token is followed by one of `successors` tokens: text a
    model can learn to predict confidently within a few hundred steps."""
    import torch

    table = torch.randint(1, vocab, (vocab, successors), generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    sequences = []
    for _ in range(count):
        n = int(torch.randint(length // 2, length + 1, (1,), generator=g))
        token, tokens = int(torch.randint(1, vocab, (1,), generator=g)), []
        for choice in torch.randint(0, successors, (n,), generator=g).tolist():
            tokens.append(token)
            token = int(table[token, choice])
        sequences.append(tokens)
    return sequences


def confident_model(shape: dict, folder: str, device, steps: int) -> None:
    """A model of `shape` trained on markov_tokens for `steps` steps and saved in fp32 to `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    for i in range(steps):
        batch = torch.tensor([s[:128] for s in markov_tokens(16, 128, shape["vocab_size"], seed=10_000 + i)
                              if len(s) >= 128] or [[1] * 128], device=device)
        with autocast:
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(folder)
    tiny_tokenizer(folder)
    return loss.item()


def bf16_parity(args, device, mesh) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from bench_bf16_parity import policy_chosen_logps, summary
    from pipeline.vocab import BELOW_REFERENCE_NATS_PER_TOKEN, BELOW_REFERENCE_NATS_PER_TOKEN_BF16
    from pipeline.logprobs import score_sequences
    from pipeline.train.parallel import load_policy

    shape = TINY if args.tiny else SMOLLM2_135M
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        final_loss = confident_model(shape, folder, device, steps=20 if args.tiny else 300)
        trained = time.perf_counter() - started
        vocab = shape["vocab_size"]
        sequences = markov_tokens(3 * 64, 200, vocab, seed=7)
        pairs = [{"prompt_ids": sequences[i][:64], "chosen_ids": sequences[i + 1], "rejected_ids": sequences[i + 2]}
                 for i in range(0, len(sequences), 3)]
        policy, _ = load_policy(folder, False, mesh, device, mixed_precision=True, activation_checkpointing=False)
        policy.eval()
        chosen = policy_chosen_logps(policy, pairs, pad_id=0, device=device)
        del policy
        results = {}
        for name, dtype in (("fp32 transformers", torch.float32), ("bf16 transformers", torch.bfloat16)):
            reference = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
            prompts = [p["prompt_ids"] for p in pairs]
            with torch.inference_mode():
                ref_chosen = score_sequences(reference, prompts, [p["chosen_ids"] for p in pairs], pad_id=0,
                                             micro_batch_size=4, device=device)
            del reference
            results[name] = summary([(ref - policy, len(p["chosen_ids"]))
                                     for ref, policy, p in zip(ref_chosen, chosen, pairs)])
    return {"model": "tiny" if args.tiny else "SmolLM2-135M shape", "training_seconds": trained,
            "training_final_loss": final_loss, "default_per_token_thresholds": {
                "fp32": BELOW_REFERENCE_NATS_PER_TOKEN, "bf16": BELOW_REFERENCE_NATS_PER_TOKEN_BF16},
            "references": results}


def sharded_load_save(args, device, mesh) -> dict:
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pipeline.train.parallel import load_policy, save_policy

    shape = {**TINY, "tie_word_embeddings": False} if args.tiny else LLAMA3_8B
    figures = {"model": "tiny" if args.tiny else "Llama-3-8B shape"}
    with tempfile.TemporaryDirectory(dir=args.scratch) as work:
        source, saved = os.path.join(work, "source"), os.path.join(work, "saved")
        started = time.perf_counter()
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.bfloat16)
        model.save_pretrained(source, max_shard_size="5GB")
        tokenizer = tiny_tokenizer(source)
        figures["parameters"] = sum(p.numel() for p in model.parameters())
        del model
        figures["write_source_seconds"] = time.perf_counter() - started

        gpu_peak_reset(device)
        peak_host_rss_reset()
        started = time.perf_counter()
        policy, _ = load_policy(source, False, mesh, device, mixed_precision=True, activation_checkpointing=False)
        figures["load"] = {"seconds": time.perf_counter() - started, "peak_gpu_gib": gpu_peak_gib(device),
                           "peak_host_rss_gib": peak_host_rss_gib()}
        gpu_peak_reset(device)
        peak_host_rss_reset()
        started = time.perf_counter()
        files = save_policy(policy, tokenizer, saved, torch.bfloat16,
                            max_file_bytes=2**16 if args.tiny else 5 * 2**30)
        figures["save"] = {"seconds": time.perf_counter() - started, "files": len(files),
                           "peak_gpu_gib": gpu_peak_gib(device), "peak_host_rss_gib": peak_host_rss_gib()}
        del policy

        started = time.perf_counter()
        written = {}
        for file in sorted(os.listdir(source)):
            if file.endswith(".safetensors"):
                with safe_open(os.path.join(source, file), "pt") as f:
                    written.update({name: (file, None) for name in f.keys()})
        unequal, compared = [], 0
        for file in sorted(os.listdir(os.path.join(saved, "model"))):
            if not file.endswith(".safetensors"):
                continue
            with safe_open(os.path.join(saved, "model", file), "pt") as f:
                for name in f.keys():
                    with safe_open(os.path.join(source, written[name][0]), "pt") as g:
                        if not torch.equal(f.get_tensor(name), g.get_tensor(name)):
                            unequal.append(name)
                    compared += 1
        figures["compare"] = {"seconds": time.perf_counter() - started, "tensors_written": len(written),
                              "tensors_saved": compared, "unequal": unequal[:10],
                              "all_equal": not unequal and compared == len(written)}
    return figures


PARTS = {"step": step, "bf16_parity": bf16_parity, "sharded_load_save": sharded_load_save}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run of the same code")
    parser.add_argument("--parts", default=",".join(PARTS), help="which parts, comma-separated")
    parser.add_argument("--scratch", default=None, help="folder for the 8B model's files (32 GB; default: $TMPDIR)")
    parser.add_argument("--out", default=os.path.join(HERE, "benchmarks", "gpu_check.json"))
    args = parser.parse_args()

    import torch
    import torch.distributed as dist
    import transformers
    from torch.distributed.device_mesh import init_device_mesh

    with socket.socket() as free:  # a group of one, on a port nothing else holds
        free.bind(("127.0.0.1", 0))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free.getsockname()[1]))
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    mesh = init_device_mesh(device.type, (1,))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    report = {"device": name,
              "torch": torch.__version__, "transformers": transformers.__version__, "tiny": args.tiny, "parts": {}}
    started = time.perf_counter()
    for name in args.parts.split(","):
        part_started = time.perf_counter()
        try:
            report["parts"][name] = PARTS[name](args, device, mesh)
        except Exception as e:  # noqa: BLE001  (one part failing must not lose the others' figures)
            import traceback

            traceback.print_exc()
            report["parts"][name] = {"error": f"{type(e).__name__}: {e}"}
        report["parts"][name]["part_seconds"] = time.perf_counter() - part_started
        report["seconds"] = time.perf_counter() - started
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"[gpu_check] {name}: {report['parts'][name]['part_seconds']:.0f} s", flush=True)
    dist.destroy_process_group()
    failed = [name for name, part in report["parts"].items() if "error" in part]
    print(f"[gpu_check] wrote {args.out} in {report['seconds']:.0f} s" + (f"; FAILED: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
