"""Shared test helpers: tiny HF models built from configs (random init, nothing downloaded)."""

from __future__ import annotations

import os
import socket

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 128


def tiny_llama(layers: int = 4, hidden: int = 64, mlp: int = 128, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(layers: int = 4, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0, use_cache=False)
    return GPT2LMHeadModel(config).eval()


def tiny_opt(layers: int = 4, seed: int = 0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=64, use_cache=False,
                       bos_token_id=0, eos_token_id=0, pad_token_id=1)
    return OPTForCausalLM(config).eval()


def tiny_bert(layers: int = 4, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                        num_attention_heads=4, max_position_embeddings=64, pad_token_id=0)
    return BertModel(config).eval()


TINY_MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "opt": tiny_opt, "bert": tiny_bert}


def model_output(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture
def token_ids() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def free_port() -> int:
    """A free TCP port on the loopback address, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the 2-process distributed tests (tests/test_distributed_*.py): CPU + gloo, or one GPU per rank + NCCL ---

DIST_DEVICE_VARIABLE = "SPARSIFY_TEST_DIST_DEVICE"


def dist_device_kind() -> str:
    """``SPARSIFY_TEST_DIST_DEVICE``: "cpu" (default; gloo) or "cuda" (NCCL, rank i on cuda:i)."""
    kind = os.environ.get(DIST_DEVICE_VARIABLE, "cpu").strip().lower() or "cpu"
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"{DIST_DEVICE_VARIABLE}={kind!r}: expected 'cpu' or 'cuda'")
    return kind


def require_dist_devices(world: int) -> str:
    """In the pytest process, before spawning ``world`` ranks: skip without torch.distributed; with
    ``cuda`` requested, *fail* (not skip: the run is meant to prove something) when the GPUs or NCCL are
    missing. Returns the device kind."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    kind = dist_device_kind()
    if kind == "cuda":
        if not torch.cuda.is_available() or torch.cuda.device_count() < world:
            pytest.fail(f"{DIST_DEVICE_VARIABLE}=cuda needs {world} GPUs, found "
                        f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
        if not dist.is_nccl_available():
            pytest.fail(f"{DIST_DEVICE_VARIABLE}=cuda needs NCCL, which this torch lacks")
    return kind


def init_dist_worker(rank: int, world: int, port: int) -> torch.device:
    """In a spawned rank: join the process group and return the device to build the model and data on.

    cpu: gloo, one thread per rank. cuda: ``torch.cuda.set_device(rank)``, NCCL bound to ``cuda:rank``,
    and deterministic algorithms (cuBLAS workspace config, deterministic attention backward) so that two
    runs on the same rank (uninterrupted vs resumed from a checkpoint) can be compared bitwise, as on the CPU.
    """
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if dist_device_kind() == "cpu":
        dist.init_process_group("gloo", rank=rank, world_size=world)
        return torch.device("cpu")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn, not raise, on an op without a deterministic kernel
    try:  # ... but leave torch.empty as it is (no NaN fill): only the choice of kernels changes
        from torch.utils import deterministic

        deterministic.fill_uninitialized_memory = False
    except ImportError:  # an older torch: it has no NaN fill either
        pass
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    return device


def to_cpu(obj):
    """``obj`` with every tensor in it (nested dicts, lists, tuples) detached and copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def print_rank_summary(what: str, rank: int, checksums: dict, decisions: int, swaps: int, values: dict | None = None) -> None:
    """One line per rank into the pytest output (visible with ``-s``): the device, the number of topology
    decisions and swaps, every layer's topology checksum and (optionally) a float64 sum of its values."""
    line = (f"[{what} on {dist_device_kind()}] rank {rank}: {decisions} topology decisions, {swaps} swaps, "
            f"checksums {list(checksums.values())}")
    if values is not None:
        line += f", values float64 sums {[round(float(v.double().sum()), 9) for v in values.values()]}"
    print(line, flush=True)


def spawn_ranks(worker, world: int, out_dir) -> None:
    """Run ``worker(rank, port, out_dir)`` in ``world`` spawned processes (after ``require_dist_devices``:
    skip or fail as it says) and wait for all of them; a rank that raises fails the caller. A rank killed by
    a signal with no Python exception (seen once on the 2-core CI machine: "terminate called without an
    active exception", SIGABRT, while both ranks compiled) is run again once, with a warning; a second
    death fails the caller."""
    import warnings

    import torch.multiprocessing as mp

    require_dist_devices(world)
    try:
        mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=world, join=True)
    except mp.ProcessExitedException as died:
        if not died.signal_name:
            raise
        warnings.warn(f"rank {died.error_index} died of {died.signal_name}; running the ranks once more")
        mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=world, join=True)
