"""GPU integration checks (not timings): torch.compile of a sparsified HF Llama on CUDA.

    python benchmarks/compile_checks_gpu.py --out results_dir

1. compiled == eager (bf16) and sparsify adds no graph break (torch._dynamo.explain, dense vs sparse);
2. a compiled model trains through 3+ topology updates with error_on_recompile=True, topology valid and
   updated in place; the Triton backend is the one that ran.
Writes compile_checks.json (device, versions, every number) and prints a table; exits non-zero on failure.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import pathlib
import sys

import torch
import torch._dynamo
import triton
import transformers
from tabulate import tabulate
from transformers import LlamaConfig, LlamaForCausalLM

from sparsify import TopologyConfig, TopologyOptimizer, block_ell, sparse_layers, sparsify
from sparsify.ops import backend_name


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm())


def build_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=256, use_cache=False,
    )
    return LlamaForCausalLM(config)


def check_compile_equals_eager(block_size: int, ids: torch.Tensor) -> dict:
    torch._dynamo.reset()
    dense = build_llama().cuda().to(torch.bfloat16).eval()
    dense_breaks = torch._dynamo.explain(dense)(ids).graph_break_count
    sparse = sparsify(copy.deepcopy(dense), layers="1..2", components="mlp", density=0.5, block_size=block_size)
    torch._dynamo.reset()
    sparse_breaks = torch._dynamo.explain(sparse)(ids).graph_break_count
    torch._dynamo.reset()
    with torch.no_grad():
        eager = sparse(ids).logits
        compiled = torch.compile(sparse)(ids).logits
    return {
        "check": f"compile == eager, B={block_size}",
        "graph_breaks_dense": dense_breaks,
        "graph_breaks_sparse": sparse_breaks,
        "rel_err_compiled_vs_eager": relative_error(compiled, eager),
        "passed": sparse_breaks == dense_breaks and relative_error(compiled, eager) < 2e-2,
    }


def check_compiled_training_through_updates(ids: torch.Tensor) -> dict:
    torch._dynamo.reset()
    model = sparsify(build_llama().cuda(), layers="1..2", components="mlp", density=0.5, block_size=16)
    optimizer = TopologyOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-3), model, TopologyConfig(score_every=2, update_every=5, seed=0)
    )
    compiled = torch.compile(model)
    storage = {name: layer.col_indices.data_ptr() for name, layer in sparse_layers(model)}
    losses = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(20):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = compiled(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    valid = True
    for name, layer in sparse_layers(model):
        block_ell.check_col_indices(layer.col_indices.cpu(), layer.num_cols, name)
        valid &= layer.col_indices.data_ptr() == storage[name]
    decisions = len({record.step for record in optimizer.history})
    swaps = sum(record.num_swaps for record in optimizer.history)
    return {
        "check": "compiled training, error_on_recompile",
        "topology_decisions": decisions,
        "blocks_swapped": swaps,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "passed": valid and decisions >= 3 and swaps > 0 and losses[-1] < losses[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    ids = torch.randint(0, 1024, (4, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results = [check_compile_equals_eager(16, ids), check_compile_equals_eager(64, ids)]
    results.append(check_compiled_training_through_updates(ids))
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
        "backend": backend_name(torch.device("cuda")),
        "checks": results,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile_checks.json").write_text(json.dumps(report, indent=2))
    print(tabulate([{k: v for k, v in r.items()} for r in results], headers="keys", tablefmt="github"))
    print(f"{report['device']}, torch {report['torch']}, triton {report['triton']}, backend {report['backend']}")
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
