"""Per-rank peak host memory of the train stage's policy code on 1, 2 and 4 gloo ranks: load, a few steps, save.

A Llama with random weights, large enough that the model rather than the Python process dominates a rank's memory
(default: about 170M parameters, 0.68 GB in fp32), saved once as safetensors. Each rank runs the trainer's own
functions without Ray around them: `load_policy` (each rank reads its own slices), two optimizer steps through
`completion_logps` and `dpop_loss`, and `save_policy`. A thread samples each rank's resident memory every 5 ms; a
phase's figure is its peak within the phase. (getrusage's maximum would not do: it is a running maximum, and a
spawned process starts with its parent's, which built the model.)

    .venv/bin/python jobs/bench_memory.py                      # writes jobs/benchmarks/memory.json
    PYTHONPATH=<checkout of an older commit> .venv/bin/python jobs/bench_memory.py --label before --out ...

The same script measures an older commit through PYTHONPATH: it uses whichever `load_policy` and `save_policy`
that checkout has (before the trainer became a package, pipeline.train held both, and save_policy took a worker).
"""
import argparse
import json
import os
import socket
import tempfile
import time
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PeakSampler:
    """This process's peak resident memory (MB) per phase, sampled on a thread."""

    def __init__(self):
        import threading

        import psutil

        self.process, self.peak, self.stopped = psutil.Process(), 0, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.stopped.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def phase_done(self) -> float:
        """The peak since the last call, in MB; the next phase starts from the current resident memory."""
        peak = max(self.peak, self.process.memory_info().rss)
        self.peak = self.process.memory_info().rss
        return round(peak / 2**20, 1)


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
                                     activation_checkpointing=False)
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
    cfg = SimpleNamespace(train=SimpleNamespace(lora=None))
    tokenizer = SimpleNamespace(save_pretrained=lambda folder: None)
    if packaged:
        save_policy(model, tokenizer, cfg, saved_dtype, out)
    else:
        save_policy(SimpleNamespace(model=model, tokenizer=tokenizer, cfg=cfg, saved_dtype=saved_dtype, rank=rank),
                    out)
    dist.barrier()
    marks["save"] = sampler.phase_done()
    queue.put((rank, marks))
    dist.destroy_process_group()


def measure(world: int, folder: str, steps: int) -> list[dict]:
    import torch.multiprocessing as mp

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
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
    result = {"label": args.label, "parameters": parameters, "model_mb_fp32": round(parameters * 4 / 2**20, 1),
              "shape": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab}, "steps": args.steps,
              "peak_rss_mb_by_ranks": runs}
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
