"""What a Llama needs to train here: GPUs, nodes and host memory per node, from its shape. The formulas are the
trainer's own bookkeeping (FSDP2 with AdamW, pipeline/train/parallel.py); jobs/bench_memory.py checks the sharded
part against measured memory, and this script writes the table in docs/scaling.md:

    .venv/bin/python jobs/scaling.py            # prints the markdown table
"""
from dataclasses import dataclass

GB = 1e9
GPU_GB = 80.0
"""An 80 GB GPU (A100/H100); 10% of it is left to the CUDA context, NCCL buffers and fragmentation."""
GPUS_PER_NODE = 8
HOST_GB = 1000.0
"""Host memory a node of 8 such GPUs can give the workers (such nodes have 1-2 TB)."""
RUNTIME_GB = 4.0
"""Host memory per worker process before any weights: Python, torch, CUDA and Ray (about 0.5 GB on CPU here, where
no CUDA runtime is loaded)."""


@dataclass(frozen=True)
class Shape:
    """A Llama's shape, as in its config.json."""
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 128
    tied: bool = False

    def layer_parameters(self) -> int:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)  # q, o; k, v
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden      # gate, up, down; norms

    def parameters(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.layer_parameters() + self.hidden

    def lora_parameters(self, r: int) -> int:
        """r-rank adapters on every linear layer of every decoder layer (train.lora.target_modules: [all-linear])."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        linears = [(self.hidden, q_out), (self.hidden, kv_out), (self.hidden, kv_out), (q_out, self.hidden),
                   (self.hidden, self.intermediate), (self.hidden, self.intermediate),
                   (self.intermediate, self.hidden)]
        return self.layers * sum(r * (fan_in + fan_out) for fan_in, fan_out in linears)


SHAPES = {
    "Llama-3.1-8B": Shape(hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8, vocab=128256),
    "Llama-3.1-70B": Shape(hidden=8192, layers=80, intermediate=28672, heads=64, kv_heads=8, vocab=128256),
}


def sharded_state_bytes(parameters: int, trainable: int, ranks: int, base_bytes: int = 4) -> float:
    """Bytes of model state one rank holds between steps: its 1/ranks of every weight (`base_bytes` each: fp32, the
    dtype training keeps), and of each trainable weight's fp32 gradient and AdamW's two fp32 moments."""
    return (parameters * base_bytes + trainable * 12) / ranks


def gpu_memory(shape: Shape, gpus: int, mode: str, tokens: int = 8192, r: int = 16) -> dict:
    """GB one GPU holds at its peak, by part, with bf16 compute (train.mixed_precision), activation checkpointing
    and `tokens` tokens per micro-batch. `mode`: `full`, `lora` or `offload` (full with train.cpu_offload)."""
    p, layer = shape.parameters(), shape.layer_parameters()
    trainable = shape.lora_parameters(r) if mode == "lora" else p
    # LoRA under bf16 compute holds its frozen base in bf16 (pipeline.train.parallel.load_policy).
    state = 0.0 if mode == "offload" else sharded_state_bytes(p, trainable, gpus, base_bytes=2 if mode == "lora" else 4)
    # FSDP2 gathers one decoder layer in bf16 and prefetches the next; in the backward each layer's full fp32
    # gradient exists until it is reduce-scattered. The root group (the output head; with tied embeddings the one
    # table) stays gathered through the step, with its full gradient; an untied input embedding is its own unit,
    # gathered for its forward and backward only.
    head = shape.vocab * shape.hidden
    grads = 4 if mode != "lora" else 0
    gathered = max(2 * layer * 2 + layer * grads, head * (2 + grads)) + head * (2 + grads)
    # Checkpointed activations: each layer's input (bf16), one layer's recomputed internals, the chunked head's
    # fp32 logits for 1,024 positions and their gradient.
    activations = tokens * shape.hidden * 2 * shape.layers + tokens * (10 * shape.hidden + 3 * shape.intermediate) * 2 \
        + 2 * 1024 * shape.vocab * 4
    return {"state": state / GB, "gathered": gathered / GB, "activations": activations / GB,
            "total": (state + gathered + activations) / GB}


def host_memory_per_node(shape: Shape, gpus: int, mode: str, r: int = 16) -> float:
    """GB of host memory a node of GPUS_PER_NODE workers needs: each worker's runtime, with cpu_offload its shard of
    the model state, and at save time one safetensors file of at most 5 GB (pipeline.train.parallel: each rank
    writes its own files; loading reads only each rank's slices)."""
    p = shape.parameters()
    offloaded = sharded_state_bytes(p, p, gpus) / GB if mode == "offload" else 0.0
    per_worker = RUNTIME_GB + offloaded + min(5.0, p * 2 / gpus / GB)
    return min(gpus, GPUS_PER_NODE) * per_worker


def smallest_fit(shape: Shape, mode: str) -> int:
    """The fewest GPUs (a whole number of nodes, or 1, 2, 4) whose per-GPU peak fits 90% of GPU_GB and whose
    nodes' host memory fits HOST_GB."""
    for gpus in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128):
        if gpu_memory(shape, gpus, mode)["total"] <= 0.9 * GPU_GB and \
                host_memory_per_node(shape, gpus, mode) <= HOST_GB:
            return gpus
    raise ValueError(f"{shape} does not fit 128 GPUs in mode {mode}")


CONFIG = {
    "full": "train: {num_workers: N, mixed_precision: bf16, activation_checkpointing: true}",
    "lora": "train: {num_workers: N, mixed_precision: bf16, activation_checkpointing: true, lora: {r: 16}}",
    "offload": "train: {num_workers: N, mixed_precision: bf16, activation_checkpointing: true, cpu_offload: true}",
}


def table() -> str:
    rows = ["| model | parameters | mode | GPUs (80 GB) | nodes of 8 | per GPU: state + gathered + activations "
            "| host memory per node | config |", "|---|---|---|---|---|---|---|---|"]
    for name, shape in SHAPES.items():
        for mode in ("full", "lora", "offload"):
            gpus = smallest_fit(shape, mode)
            memory = gpu_memory(shape, gpus, mode)
            rows.append(f"| {name} | {shape.parameters() / 1e9:.1f}B | {mode} | {gpus} | "
                        f"{max(1, -(-gpus // GPUS_PER_NODE))} | {memory['state']:.1f} + {memory['gathered']:.1f} + "
                        f"{memory['activations']:.1f} = {memory['total']:.1f} GB | "
                        f"{host_memory_per_node(shape, gpus, mode):.0f} GB | "
                        f"`{CONFIG[mode].replace('N', str(gpus))}` |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
