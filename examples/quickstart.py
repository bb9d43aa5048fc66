"""Quick start: sparsify the middle MLPs of a small HF Llama and train it with a dynamic topology.

    python examples/quickstart.py            # CPU or GPU; about a minute on two CPU cores
    python examples/quickstart.py --steps 200 --density 0.25
    python examples/quickstart.py --no-cuda-graphs  # GPU: eager (by default the decoder layers run as CUDA graphs)

The model is built from a config (random init, nothing is downloaded) and learns, character by
character, the Zen of Python, which ships inside every Python as the module ``this``.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import time

import torch
from tabulate import tabulate
from transformers import LlamaConfig, LlamaForCausalLM

from sparsify import TopologyConfig, TopologyOptimizer, compile_repeated_layers, sparsify, sparsity_table, topology_report


def zen_of_python() -> torch.Tensor:
    """The Zen of Python as bytes: ``this.s`` holds it ROT13-encoded (importing ``this`` prints it)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return torch.tensor(list(codecs.decode(this.s, "rot13").encode()), dtype=torch.long)


def batches(text: torch.Tensor, batch_size: int, length: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(text) - length - 1, (batch_size,), generator=generator)
        yield torch.stack([text[s : s + length] for s in starts.tolist()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--layers", default="1..2", help="which decoder layers get sparse MLPs, e.g. '1..2'")
    parser.add_argument("--update-every", type=int, default=20, help="steps between topology decisions (Level 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="compile each decoder layer with mode='reduce-overhead' (CUDA graphs: no host cost per "
                             "layer call); default: on with --device cuda")
    args = parser.parse_args()
    if args.cuda_graphs and args.device != "cuda":
        parser.error(f"--cuda-graphs needs --device cuda, not {args.device}")
    if args.cuda_graphs is None:  # eager small layers are host-bound on a GPU (README, "Host time")
        args.cuda_graphs = args.device == "cuda"

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, use_cache=False,
    )
    model = LlamaForCausalLM(config)
    sparsify(model, layers=args.layers, components=("mlp",), density=args.density, block_size=args.block_size)
    model.to(args.device)
    print(sparsity_table(model))
    if args.cuda_graphs:
        print("compiled into CUDA graphs:", ", ".join(compile_repeated_layers(model)))

    optimizer = TopologyOptimizer(
        torch.optim.AdamW(model.parameters(), lr=3e-3),
        model,
        TopologyConfig(score_every=5, update_every=args.update_every, seed=0),
    )
    data = batches(zen_of_python(), batch_size=8, length=64, generator=torch.Generator().manual_seed(0))
    rows, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        ids = next(data).to(args.device)
        if args.cuda_graphs:  # a new step: the previous step's graph outputs are dead
            torch.compiler.cudagraph_mark_step_begin()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 10 == 0 or step == args.steps:
            swaps = sum(record.num_swaps for record in optimizer.history)
            rows.append([step, f"{loss.item():.3f}", swaps, f"{time.perf_counter() - start:.1f}"])
    print(tabulate(rows, headers=["step", "loss", "blocks swapped so far", "seconds"], tablefmt="github"))
    print(topology_report(model, optimizer))


if __name__ == "__main__":
    main()
