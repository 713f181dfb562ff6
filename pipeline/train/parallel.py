"""All parallelism and the sharded policy: FSDP2 `parallelize`, LoRA adapters, loading and saving the policy."""
import json
import math
import os

from pipeline import storage
from pipeline.train.metrics import say


def device_mesh(device_type: str, world: int, shard_size: int):
    """The workers' mesh: 1-D when one shard group holds every worker (plain FSDP), else 2-D, (replicas, shards)
    with rows of consecutive ranks as the shard groups, on which `fully_shard` is HSDP."""
    from torch.distributed.device_mesh import init_device_mesh

    if shard_size == world:
        return init_device_mesh(device_type, (world,))
    return init_device_mesh(device_type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def parallelize(model, mesh, mixed_precision: bool, activation_checkpointing: bool,
                reshard_after_forward: bool = True, cpu_offload: bool = False) -> None:
    """All parallelism in one place: FSDP2 `fully_shard` on each decoder layer (and an untied input embedding),
    then on the root, over `mesh` (device_mesh: 2-D for HSDP).

    Sharding layer by layer lets FSDP2 gather one layer's weights at a time. With `mixed_precision`, compute runs
    in bf16 while parameters, gradients' reduction and optimizer state stay fp32. `reshard_after_forward`
    (train.reshard_after_forward) frees a layer's gathered weights after its forward, to gather them again for its
    backward. `cpu_offload` (train.cpu_offload) keeps the shards, their gradients and so the optimizer state in host
    memory (FSDP2's CPUOffloadPolicy).
    """
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision else MixedPrecisionPolicy())
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules); cannot shard it")
    # Pinned host memory speeds the copies to the GPU; without a GPU there is none to pin.
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    # An untied input embedding is a unit of its own, gathered for its forward and backward only; left in the root
    # group it would stay gathered, with its full gradient, through the whole step (6.3 GB a GPU for a 70B Llama's
    # 128k x 8192 table in bf16 plus its fp32 gradient). The output head stays in the root group: the chunked
    # completion-only head (pipeline.logprobs) reads its weight inside the root's forward.
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is not embeddings.weight:
        layers = [embeddings, *layers]
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                    offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                offload_policy=offload)


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
                activation_checkpointing: bool, lora=None, reshard_after_forward: bool = True,
                cpu_offload: bool = False):
    """The policy, sharded, with no rank ever holding all of it (as torchtitan loads a Hugging Face checkpoint).

    Every rank builds the model with its weights on the meta device (no memory; its non-persistent buffers, the
    rotary frequencies, computed for real), shards it (`parallelize`), allocates only its shard, and reads only
    its own slices of each tensor from the model folder's safetensors files (DCP's HuggingFaceStorageReader; on an
    object store, such as the last online round's policy, `SafetensorsObjectStoreReader`'s ranged reads). A 70B
    policy on 32 GPUs is thus 1/32 of the weights per rank at load, never 280 GB of fp32 on one host. Weights load in
    the dtype training keeps: fp32 master weights (a bf16 checkpoint is upcast), or with LoRA and
    `mixed_precision` a bf16 frozen base; bf16 compute comes from FSDP2's mixed-precision policy. Dropout is off. With
    `lora`, adapters are added before sharding and initialised as peft does (A Kaiming-uniform, B zero), the same
    on every rank: each draws the same full A from the seeded generator and keeps its shard. With `cpu_offload` the
    shards are allocated in host memory and only the non-persistent buffers go to `device`, where the layers run.
    """
    import torch
    import torch.distributed.checkpoint as dcp
    from accelerate import init_empty_weights
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.tensor import distribute_tensor
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.train.readers import SafetensorsObjectStoreReader

    with storage.local_copy(path, weights=False) as files:
        config = AutoConfig.from_pretrained(files, trust_remote_code=trust_remote_code)
    # Full fine-tuning keeps fp32 master weights. LoRA under bf16 compute keeps its frozen base in bf16, the dtype
    # its forward uses anyway: half the bytes of the largest thing each rank holds (peft keeps the adapters fp32).
    base_dtype = torch.bfloat16 if lora and mixed_precision else torch.float32
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=base_dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # (from_config ties a head to its embedding, but not under init_empty_weights)
    disable_dropout(model)
    if lora:
        model = add_adapters(model, lora)
    persistent = set(model.state_dict())
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers() if name not in persistent}
    parallelize(model, mesh, mixed_precision=mixed_precision, activation_checkpointing=activation_checkpointing,
                reshard_after_forward=reshard_after_forward, cpu_offload=cpu_offload)
    model.to_empty(device="cpu" if cpu_offload else device)
    for module_name, module in model.named_modules():
        for name in list(module._buffers):
            full_name = f"{module_name}.{name}" if module_name else name
            if full_name in buffers:
                module._buffers[name] = buffers[full_name].to(device)

    state = get_model_state_dict(model)
    reader = SafetensorsObjectStoreReader(path) if storage.is_remote(path) else HuggingFaceStorageReader(path)
    in_files = set(reader.read_metadata().state_dict_metadata)
    if not in_files:
        raise ValueError(f"{path} holds no safetensors files: the trainer reads each rank's slices from them")
    aliases = _tied_aliases(model)
    to_read, adapters = {}, []
    for name, tensor in state.items():
        if ".lora_A." in name or ".lora_B." in name:
            adapters.append(name)
        elif _hf_name(name) in in_files:
            to_read[_hf_name(name)] = tensor
        elif name not in aliases:  # a tied head shares the embedding's tensor: it is filled with it
            raise ValueError(f"{path} has no weight {_hf_name(name)!r} (its safetensors files hold "
                             f"{len(in_files)} tensors)")
    dcp.load(to_read, storage_reader=reader)
    with torch.no_grad():
        for name in adapters:  # in state order, the same on every rank, so the same draws
            sharded = state[name]
            full = torch.zeros(sharded.shape)
            if ".lora_A." in name:
                torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5))
            # Every rank drew the same full tensor: each keeps its slice, with no communication (src_data_rank None).
            sharded.copy_(distribute_tensor(full.to(sharded.device), sharded.device_mesh, sharded.placements,
                                            src_data_rank=None))
    return model, config.dtype


def _tied_aliases(model) -> set[str]:
    """Names of parameters that are another parameter under a second name (a tied head is the embedding table)."""
    return set(dict(model.named_parameters(remove_duplicate=False))) - set(dict(model.named_parameters()))


def _hf_name(name: str) -> str:
    """A parameter's name in the model folder's files: peft's wrapping prefixes and `base_layer` removed."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


MAX_FILE_BYTES = 5 * 2**30
"""The largest safetensors file a rank writes (the Hub's convention of 5 GB files): a rank holds at most one file's
tensors at a time."""


def save_policy(model, tokenizer, out: str, dtype, lora=None, max_file_bytes: int = MAX_FILE_BYTES) -> list[str]:
    """The final policy in Hugging Face format, written from the shards with no rank ever holding all of it (a
    collective: every worker takes part). Returns the files this rank wrote.

    - `model/`: safetensors files plus their index, in `dtype` (train.save_dtype), with the config, generation config
      and tokenizer. Each file has one writer rank; the ranks' files hold about equal bytes, so all of them write at
      once and none waits on another's upload. Every tensor is gathered once (an all-gather of one tensor, cast to
      `dtype` first) and kept only by its file's writer, which holds at most one file's tensors at a time.
    - With `lora` (train.lora): `adapter/` in peft format from the adapters' shards alone (fp32, as peft saves them),
      and with `lora.merge` the merged model as `model/`, each weight merged as it is gathered (W + alpha / r * B @ A,
      as peft's merge computes it), never a second copy of the whole base.

    (DCP's HuggingFaceStorageWriter with consolidation would need every rank's shard files on one shared disk; here
    the only shared place may be an object store.)"""
    import torch.distributed as dist

    written = []
    if lora:
        _save_adapters(model, storage.join(out, "adapter"))
        if not lora.merge:
            return written
    target = storage.join(out, "model")
    tensors = _hf_tensors(model)
    sizes = {name: math.prod(shape) * dtype.itemsize for name, (shape, _) in tensors.items()}
    files = _file_plan(sizes, dist.get_world_size(), max_file_bytes)
    rank = dist.get_rank()
    for file_name, (writer, names) in files.items():
        kept = {}
        for name in names:
            _, full = tensors[name]
            value = full(dtype)  # every rank takes part in the gather
            if writer == rank:
                kept[name] = value.cpu().contiguous()
        if writer == rank:
            _write_safetensors(kept, target, file_name)
            written.append(file_name)
    if rank == 0:
        _write_model_files(model, tokenizer, dtype, target, files, sizes)
        say(f"saved the policy to {target} ({len(files)} safetensors files from {dist.get_world_size()} ranks)")
    return written


def _hf_tensors(model) -> dict:
    """{name in the Hugging Face files: (shape, full(dtype))}, in the model's state order, where `full(dtype)` gathers
    that tensor (a collective) and returns it whole in `dtype`. With LoRA adapters these are the merged base weights:
    the adapters themselves are left out. Tied weights appear once, under the name the model's own files use."""
    import torch
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model)
    aliases = _tied_aliases(model)

    def merged(prefix, weight, dtype):
        # peft's merge: W + scaling * (B @ A), in fp32, then cast
        module = model.get_submodule(prefix)
        (adapter,) = module.lora_A.keys()
        lora_a, lora_b = (_full(state[f"{prefix}.lora_{ab}.{adapter}.weight"], torch.float32) for ab in "AB")
        return (_full(weight, torch.float32) + module.scaling[adapter] * (lora_b @ lora_a)).to(dtype)

    tensors = {}
    for name, sharded in state.items():
        if ".lora_A." in name or ".lora_B." in name or name in aliases:
            continue
        if name.endswith(".base_layer.weight"):
            prefix = name.removesuffix(".base_layer.weight")
            full = (lambda dtype, prefix=prefix, sharded=sharded: merged(prefix, sharded, dtype))
        else:
            full = (lambda dtype, sharded=sharded: _full(sharded, dtype))
        tensors[_hf_name(name)] = (tuple(sharded.shape), full)
    return tensors


def _full(sharded, dtype):
    """The whole tensor of a sharded parameter, in `dtype`, on the device its mesh computes on (a CPU-offloaded
    shard goes to the GPU first, so the all-gather runs over NCCL). A collective: every rank calls it."""
    import torch

    mesh_device = sharded.device_mesh.device_type
    device = torch.device(mesh_device, torch.cuda.current_device()) if mesh_device == "cuda" else torch.device("cpu")
    return sharded.to(device=device, dtype=dtype).full_tensor()


def _file_plan(sizes: dict[str, int], world: int, max_file_bytes: int) -> dict[str, tuple[int, list[str]]]:
    """{file name: (writer rank, tensor names)}: the tensors in order, cut into `world` runs of about equal bytes
    (rank r writes run r), each run cut into files of at most `max_file_bytes` (or one tensor). The same on every
    rank, since it depends only on the shapes. One file is `model.safetensors`; more are numbered as the Hub's are."""
    total = sum(sizes.values()) or 1
    runs: list[list[str]] = [[] for _ in range(world)]
    done = 0
    for name, size in sizes.items():
        # The run whose share of the bytes holds this tensor's middle.
        runs[min(world - 1, int((done + size / 2) * world / total))].append(name)
        done += size
    files = []
    for rank, names in enumerate(runs):
        current, current_bytes = [], 0
        for name in names:
            if current and current_bytes + sizes[name] > max_file_bytes:
                files.append((rank, current))
                current, current_bytes = [], 0
            current.append(name)
            current_bytes += sizes[name]
        if current:
            files.append((rank, current))
    if len(files) == 1:
        return {"model.safetensors": files[0]}
    return {f"model-{i:05d}-of-{len(files):05d}.safetensors": file for i, file in enumerate(files, 1)}


def _write_safetensors(tensors: dict, target: str, file_name: str) -> None:
    from safetensors.torch import save_file

    with storage.staged_dir(target) as folder:
        save_file(tensors, os.path.join(folder, file_name), metadata={"format": "pt"})


def _write_model_files(model, tokenizer, dtype, target: str, files: dict, sizes: dict) -> None:
    """Rank 0's part: the safetensors index (when there is more than one file), the config in the saved dtype, the
    generation config and the tokenizer."""
    import copy

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = copy.deepcopy(base.config)
    config.dtype = dtype
    if not config.architectures:  # (FSDP2 renamed the class: FSDPLlamaForCausalLM)
        config.architectures = [type(base).__name__.removeprefix("FSDP")]
    with storage.staged_dir(target) as folder:
        config.save_pretrained(folder)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if len(files) > 1:
            weight_map = {name: file_name for file_name, (_, names) in files.items() for name in names}
            with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": sum(sizes.values())},
                           "weight_map": weight_map}, f, indent=2)


def _save_adapters(model, target: str) -> None:
    """adapter/ in peft format: only the adapters are gathered (a collective), and rank 0 writes them."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    adapters = {name: _full(value, value.dtype).cpu()
                for name, value in get_model_state_dict(model).items() if ".lora_A." in name or ".lora_B." in name}
    if dist.get_rank() == 0:
        with storage.staged_dir(target) as folder:
            model.save_pretrained(folder, state_dict=adapters)  # peft writes the adapters and adapter_config.json
        say(f"saved the adapters to {target}")
