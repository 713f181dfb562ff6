"""The trainer's FSDP2 code in this process (a gloo group of one): meta-device loading, the chunked output head
under FSDP2 (tied and untied embeddings), and bf16 mixed precision on CPU, each against a plain unsharded model."""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pipeline.logprobs import completion_logps, make_batch
from pipeline.train.parallel import load_policy, parallelize

GROUPS = [([5, 6, 7, 8], [[9, 10, 11], [12, 13]]), ([14, 15], [[16, 17, 18, 19], [20]]), ([21], [[22], [23, 24]])]


@pytest.fixture(scope="module")
def mesh():
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


def full_tensor(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@pytest.mark.parametrize("tied", [False, True])
def test_meta_device_loading_gives_the_saved_weights_and_buffers(mesh, tmp_path, tiny_model, tied):
    """The demo's model (untied head) and a tied one (as SmolLM2's: the head is the embedding table, and the files
    hold it once)."""
    if tied:
        llama(tied=True).save_pretrained(tmp_path)
    folder = str(tmp_path) if tied else tiny_model
    model, saved_dtype = load_policy(folder, False, mesh, torch.device("cpu"), mixed_precision=False,
                                     activation_checkpointing=False)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    head = model.get_output_embeddings().weight
    assert (head is model.get_input_embeddings().weight) == tied
    loaded = {k: full_tensor(v) for k, v in model.state_dict().items()}
    assert loaded.keys() == reference.state_dict().keys()
    for name, value in reference.state_dict().items():
        assert torch.equal(loaded[name], value), name
    # Non-persistent buffers (rotary frequencies) are in no state dict: set from the loaded model's.
    buffers = dict(model.named_buffers())
    for name, value in reference.named_buffers():
        assert torch.equal(full_tensor(buffers[name]), value), name
    assert saved_dtype == reference.config.dtype
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-6)


@pytest.mark.parametrize("tied, reshard_after_forward", [(False, True), (True, True), (True, False)])
def test_chunked_head_under_fsdp2_has_the_gradients_of_a_plain_model(mesh, tied, reshard_after_forward):
    """The head's weight belongs to FSDP2's root group and is used inside the model's forward: its gradient, and
    every other, must equal an unsharded model's (tied: embedding and head are one parameter), whether the layers
    reshard after their forward or keep their weights to the backward (train.reshard_after_forward)."""
    plain = llama(tied)
    sharded = copy.deepcopy(plain)
    parallelize(sharded, mesh, mixed_precision=False, activation_checkpointing=False,
                reshard_after_forward=reshard_after_forward)
    for model in (plain, sharded):
        completion_logps(model, make_batch(GROUPS, pad_id=0, layout="packed")).sum().backward()
    plain_grads = dict(plain.named_parameters())
    for name, param in sharded.named_parameters():
        assert torch.allclose(full_tensor(param.grad), plain_grads[name].grad, atol=1e-5), name


def test_bf16_mixed_precision_computes_in_bf16_and_keeps_fp32_weights(mesh):
    """train.mixed_precision: bf16 on CPU: layers compute in bf16, weights, gradients and so the optimizer stay
    fp32, and the log-probs stay within bf16 rounding of the fp32 ones."""
    plain = llama(tied=True)
    mixed = copy.deepcopy(plain)
    parallelize(mixed, mesh, mixed_precision=True, activation_checkpointing=False)
    seen = []
    mixed.model.layers[0].mlp.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    batch = make_batch(GROUPS, pad_id=0, layout="packed")
    logps = completion_logps(mixed, batch)
    logps.sum().backward()
    assert seen == [torch.bfloat16]
    assert logps.dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in mixed.parameters())
    assert all(torch.isfinite(full_tensor(p.grad)).all() for p in mixed.parameters())
    with torch.no_grad():
        exact = completion_logps(plain, batch)
    assert (logps.detach() - exact).abs().max() < 0.1  # nats over a few tokens; bf16 keeps 8 bits of mantissa


def test_cpu_offload_trains_the_same_weights(mesh, tiny_model):
    """train.cpu_offload (FSDP2's CPUOffloadPolicy; on CPU workers nothing moves, but the same code runs): a step
    gives the same log-probs, and the same weights after AdamW, as without it."""
    trained = []
    for offload in (False, True):
        model, _ = load_policy(tiny_model, False, mesh, torch.device("cpu"), mixed_precision=False,
                               activation_checkpointing=False, cpu_offload=offload)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        logps = completion_logps(model, make_batch(GROUPS, pad_id=0, layout="packed"))
        logps.sum().backward()
        optimizer.step()
        trained.append((logps.detach(), {k: full_tensor(v) for k, v in model.state_dict().items()}))
    (plain_logps, plain), (offloaded_logps, offloaded) = trained
    assert torch.equal(plain_logps, offloaded_logps)
    for name, value in plain.items():
        assert torch.equal(offloaded[name], value), name
