"""All parallelism and the sharded policy: FSDP2 `parallelize`, LoRA adapters, loading and saving the policy."""
import json
import os
import tempfile

from pipeline import storage
from pipeline.config import Config
from pipeline.train.metrics import say


def parallelize(model, mesh, mixed_precision: bool, activation_checkpointing: bool,
                reshard_after_forward: bool = True) -> None:
    """All parallelism in one place: FSDP2 `fully_shard` on each decoder layer, then on the root.

    Sharding layer by layer lets FSDP2 gather one layer's weights at a time. With `mixed_precision`, compute runs
    in bf16 while parameters, gradients' reduction and optimizer state stay fp32. `reshard_after_forward`
    (train.reshard_after_forward) frees a layer's gathered weights after its forward, to gather them again for its
    backward.
    """
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision else MixedPrecisionPolicy())
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules); cannot shard it")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def disable_dropout(model) -> None:
    """Dropout off, as TRL does: with it the policy scores a pair differently from the reference (and from itself)
    at step 0, and DPOP's one-sided penalty pushes on that noise. Covers nn.Dropout modules and the attention
    dropout rate that transformers' attention layers keep as a float."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    if isinstance(getattr(model.config, "attention_dropout", None), float):
        model.config.attention_dropout = 0.0


def add_adapters(model, lora):
    """`model` with peft LoRA adapters (`train.lora`) on its target layers; only the adapters require grad. The
    base model's weights are untouched, so the policy starts equal to the reference (each B is zero)."""
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=targets, bias="none", task_type="CAUSAL_LM"))


def load_policy(path: str, trust_remote_code: bool, mesh, device, mixed_precision: bool,
                activation_checkpointing: bool, lora=None, reshard_after_forward: bool = True):
    """The policy, sharded, with no rank ever holding all of it (as torchtitan loads a Hugging Face checkpoint).

    Every rank builds the model with its weights on the meta device (no memory; its non-persistent buffers, the
    rotary frequencies, computed for real), shards it (`parallelize`), allocates only its shard, and reads only
    its own slices of each tensor from the model folder's safetensors files (DCP's HuggingFaceStorageReader). A 70B
    policy on 32 GPUs is thus 1/32 of the weights per rank at load, never 280 GB of fp32 on one host. Weights load in
    fp32 (a bf16 checkpoint is upcast); bf16 compute comes from FSDP2's mixed-precision policy. Dropout is off. With
    `lora`, adapters are added before sharding and initialised as peft does (A Kaiming-uniform, B zero), the same
    on every rank: each draws the same full A from the seeded generator and keeps its shard.
    """
    import math

    import torch
    import torch.distributed.checkpoint as dcp
    from accelerate import init_empty_weights
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.tensor import distribute_tensor
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    disable_dropout(model)
    if lora:
        model = add_adapters(model, lora)
    persistent = set(model.state_dict())
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers() if name not in persistent}
    parallelize(model, mesh, mixed_precision=mixed_precision, activation_checkpointing=activation_checkpointing,
                reshard_after_forward=reshard_after_forward)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in buffers:
                buffer.copy_(buffers[name])

    state = get_model_state_dict(model)
    in_files = set(_safetensors_keys(path))
    aliases = set(dict(model.named_parameters(remove_duplicate=False))) - set(dict(model.named_parameters()))
    to_read, adapters = {}, []
    for name, tensor in state.items():
        if ".lora_A." in name or ".lora_B." in name:
            adapters.append(name)
        elif _hf_name(name) in in_files:
            to_read[_hf_name(name)] = tensor
        elif name not in aliases:  # a tied head shares the embedding's tensor: it is filled with it
            raise ValueError(f"{path} has no weight {_hf_name(name)!r} (its safetensors files hold "
                             f"{len(in_files)} tensors)")
    dcp.load(to_read, storage_reader=HuggingFaceStorageReader(path))
    with torch.no_grad():
        for name in adapters:  # in state order, the same on every rank, so the same draws
            sharded = state[name]
            full = torch.zeros(sharded.shape)
            if ".lora_A." in name:
                torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5))
            sharded.copy_(distribute_tensor(full.to(device), sharded.device_mesh, sharded.placements))
    return model, config.dtype


def _hf_name(name: str) -> str:
    """A parameter's name in the model folder's files: peft's wrapping prefixes and `base_layer` removed."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _safetensors_keys(path: str) -> list[str]:
    """The tensor names of a model folder's safetensors files, from their headers (the index, or the one file)."""
    import glob

    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return list(json.load(f)["weight_map"])
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"{path} holds no safetensors files: the trainer reads each rank's slices from them")
    keys = []
    for file in files:
        with safe_open(file, framework="pt") as f:
            keys += list(f.keys())
    return keys


def save_policy(model, tokenizer, cfg: Config, saved_dtype, out: str) -> None:
    """Gather the sharded weights (a collective: every worker takes part); rank 0 writes the HF model as model/,
    in `saved_dtype` (the dtype the model was loaded from). With LoRA: the adapters as adapter/ (peft format), and
    with train.lora.merge the merged model as model/."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return
    lora = cfg.train.lora
    if lora:
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder, state_dict=full_state)  # peft keeps the adapters' entries only
            storage.upload_dir(folder, storage.join(out, "adapter"))
        say(f"saved the adapters to {storage.join(out, 'adapter')}")
        if not lora.merge:
            return
        policy = merged_policy(cfg, full_state)
        full_state = policy.state_dict()
    else:
        policy = model
    full_state = {k: v.to(saved_dtype) for k, v in full_state.items()}
    with tempfile.TemporaryDirectory() as folder:
        policy.save_pretrained(folder, state_dict=full_state)
        tokenizer.save_pretrained(folder)
        storage.upload_dir(folder, storage.join(out, "model"))
    say(f"saved the policy to {storage.join(out, 'model')}")


def merged_policy(cfg: Config, adapted_state: dict):
    """The base model with the trained adapters folded into its weights (W + alpha / r * B @ A), on the CPU: a
    plain transformers model that `from_pretrained` and vLLM load without peft."""
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.float32,
                                                trust_remote_code=cfg.model.trust_remote_code)
    adapted = add_adapters(base, cfg.train.lora)
    adapted.load_state_dict(adapted_state)
    return adapted.merge_and_unload()
