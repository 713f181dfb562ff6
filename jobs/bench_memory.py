"""Per-rank peak host memory of the train stage's policy code on 1, 2 and 4 gloo ranks: load, a few steps, save.

A Llama with random weights, large enough that the model rather than the Python process dominates a rank's memory
(default: 477M parameters, 1.8 GB in fp32: hidden 1024, 32 layers, vocabulary 32,000), saved once as safetensors.
Each rank runs the trainer's own functions without Ray around them: `load_policy` (each rank reads its own slices),
two AdamW steps through `completion_logps` and `dpop_loss` with activation checkpointing (as a big model trains;
without it each rank's activations, the same at any rank count, are most of what does not shrink), and
`save_policy`. A thread samples each rank's memory every 5 ms; a phase's figure is its peak within the phase, both
resident (RSS) and private (RSS less file-backed pages: the safetensors files loading maps are shared page cache).
(getrusage's maximum would not do: it is a running maximum, and a spawned process starts with its parent's, which
built the model.) `checks` in the JSON holds issue 20's goals and jobs/scaling.py's formula against the measurement.

    .venv/bin/python jobs/bench_memory.py                      # writes jobs/benchmarks/memory.json
    PYTHONPATH=<checkout of an older commit> .venv/bin/python jobs/bench_memory.py --label before

The same script measures an older commit through PYTHONPATH: it uses whichever `load_policy` and `save_policy`
that checkout has (before the trainer became a package, pipeline.train held both, and save_policy took a worker).
"""
import argparse
import inspect
import json
import os
import socket
import sys
import tempfile
import time
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "jobs"))  # scaling.py


class PeakSampler:
    """This process's peak memory (MB) per phase, sampled on a thread: resident (RSS) and private (RSS less the
    file-backed and shared pages: the memory the rank itself allocated; the safetensors files that loading maps
    are page cache that every rank on a host shares and the kernel can drop)."""

    def __init__(self):
        import threading

        import psutil

        self.process, self.stopped = psutil.Process(), threading.Event()
        self.peak = self._now()
        threading.Thread(target=self._run, daemon=True).start()

    def _now(self) -> tuple[int, int]:
        info = self.process.memory_info()
        return info.rss, info.rss - info.shared

    def _run(self):
        while not self.stopped.wait(0.005):
            self.peak = tuple(map(max, self.peak, self._now()))

    def phase_done(self) -> dict:
        """The peaks since the last call, in MB; the next phase starts from the current memory."""
        peak = tuple(map(max, self.peak, self._now()))
        self.peak = self._now()
        return {"rss": round(peak[0] / 2**20, 1), "private": round(peak[1] / 2**20, 1)}


def build_model(folder: str, hidden: int, layers: int, vocab: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         head_dim=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def rank_main(rank: int, world: int, port: int, folder: str, out: str, steps: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from pipeline.logprobs import completion_logps, make_batch
    from pipeline.loss import dpop_loss
    try:
        from pipeline.train.parallel import load_policy, save_policy
        packaged = True
    except ImportError:  # an older commit: one train module
        from pipeline.train import load_policy, save_policy
        packaged = False

    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    sampler = PeakSampler()
    marks = {"start": sampler.phase_done()}
    device = torch.device("cpu")
    model, saved_dtype = load_policy(folder, False, init_device_mesh("cpu", (world,)), device, mixed_precision=False,
                                     activation_checkpointing=True)
    dist.barrier()
    marks["load"] = sampler.phase_done()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        groups = [(torch.randint(0, 1000, (64,), generator=generator).tolist(),
                   [torch.randint(0, 1000, (32,), generator=generator).tolist() for _ in range(2)]) for _ in range(2)]
        logps = completion_logps(model, make_batch(groups, 0, "packed")).view(-1, 2)
        ref = logps.detach()
        dpop_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], 0.1, 50.0).losses.sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    dist.barrier()
    marks["step"] = sampler.phase_done()
    tokenizer = SimpleNamespace(save_pretrained=lambda folder: None)
    if "dtype" in inspect.signature(save_policy).parameters:  # sharded saving
        save_policy(model, tokenizer, out, saved_dtype)
    elif packaged:  # an older commit: rank 0 gathers the whole model
        save_policy(model, tokenizer, SimpleNamespace(train=SimpleNamespace(lora=None)), saved_dtype, out)
    else:
        save_policy(SimpleNamespace(model=model, tokenizer=tokenizer, cfg=SimpleNamespace(train=SimpleNamespace(
            lora=None)), saved_dtype=saved_dtype, rank=rank), out)
    dist.barrier()
    marks["save"] = sampler.phase_done()
    queue.put((rank, marks))
    dist.destroy_process_group()


def measure(world: int, folder: str, steps: int) -> list[dict]:
    import torch.multiprocessing as mp

    # glibc keeps freed blocks below its (growing) mmap threshold in the heap, so a rank's RSS would also count
    # tensors it has freed, by an amount that differs from rank to rank (seen: 260 MB apart on identical ranks).
    # A fixed 128 kB threshold returns every freed tensor to the system: the figure is then what the rank holds, as
    # torch.cuda.max_memory_allocated counts on a GPU.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as out:
        processes = [context.Process(target=rank_main, args=(rank, world, port, folder, out, steps, queue))
                     for rank in range(world)]
        for p in processes:
            p.start()
        results = dict(queue.get(timeout=1800) for _ in processes)
        for p in processes:
            p.join()
    return [{"rank": rank, **results[rank]} for rank in sorted(results)]


def checks(runs: dict, parameters: int) -> dict:
    """Issue 20's goals on private memory, and the sharded state's formula (jobs/scaling.py) against what was saved:
    - spread: per rank count and phase, (largest - smallest rank's peak) / the model's fp32 bytes (goal: <= 0.15);
    - ratio: the largest rank's peak over all phases at each rank count / the 1-rank peak (goal at 4: <= 0.40);
    - state: the step peak's drop from 1 rank to n, measured and as the formula predicts (the model state each rank
      no longer holds: 16 bytes a parameter, fp32 weight, gradient and AdamW's two moments, times 1 - 1/n)."""
    from scaling import sharded_state_bytes

    model_mb = parameters * 4 / 2**20

    def peak(world: str, phase: str | None = None) -> float:
        return max(rank[p]["private"] for rank in runs[world] for p in ((phase,) if phase else PHASES))

    out = {"spread": {world: {phase: round((peak(world, phase) - min(r[phase]["private"] for r in ranks)) / model_mb,
                                           3) for phase in PHASES} for world, ranks in runs.items()}}
    if "1" in runs:
        out["ratio"] = {world: round(peak(world) / peak("1"), 3) for world in runs}
        out["state"] = {world: {"measured_mb": round(peak("1", "step") - peak(world, "step"), 1),
                                "predicted_mb": round((sharded_state_bytes(parameters, parameters, 1)
                                                       - sharded_state_bytes(parameters, parameters, int(world)))
                                                      / 2**20, 1)} for world in runs if world != "1"}
    return out


PHASES = ("load", "step", "save")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--label", default="now")
    parser.add_argument("--out", default=os.path.join(REPO, "jobs", "benchmarks", "memory.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        parameters = build_model(folder, args.hidden, args.layers, args.vocab)
        runs = {}
        for world in args.ranks:
            started = time.time()
            runs[str(world)] = measure(world, folder, args.steps)
            print(f"{args.label}: {world} rank(s): {runs[str(world)]} ({time.time() - started:.0f} s)", flush=True)
    model_mb = parameters * 4 / 2**20
    result = {"label": args.label, "parameters": parameters, "model_mb_fp32": round(model_mb, 1),
              "shape": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab}, "steps": args.steps,
              "activation_checkpointing": True, "peak_mb_by_ranks": runs, "checks": checks(runs, parameters)}
    print(json.dumps(result["checks"], indent=1))
    existing = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            existing = json.load(f)
    existing[args.label] = result
    with open(args.out, "w") as f:
        json.dump(existing, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
