"""Train a small HF Llama whose MLPs are block-sparse and let their topology evolve.

    python examples/train_hf.py                      # plain loop, CPU, about a minute
    python examples/train_hf.py --trainer            # the same through transformers.Trainer
    python examples/train_hf.py --steps 2000 --hidden 256 --device cuda

The model is built from a LlamaConfig (random init, no download) and trained as a character-level
language model on text that ships with Python (the standard library's own source), so it runs
offline. Every topology decision is logged (``sparsify.topology``) and appended to
``<out>/decisions.jsonl``; at the end ``<out>`` holds the topology report, the swap-rate plot, the
loss curve and block masks of one layer before and after training.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparsify import TopologyConfig, TopologyOptimizer, compile_repeated_layers, sparsify, sparsity_table, topology_report
from sparsify.topology import diff, plot_block_mask, plot_swap_rate, snapshot, swap_rates

log = logging.getLogger("train_hf")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/train_hf", help="output directory for logs and plots")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--sparse-layers", default=None, help='which decoder layers to sparsify, e.g. "1..3"; default all')
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--score-every", type=int, default=10)
    p.add_argument("--update-every", type=int, default=50, help="steps between topology decisions (library default 100)")
    p.add_argument("--prune-fraction", type=float, default=0.1)
    p.add_argument("--swap-threshold", type=float, default=1.5)
    p.add_argument("--epsilon", type=float, default=0.05)
    p.add_argument("--scorer", choices=("gradient", "magnitude"), default="gradient")
    p.add_argument("--grow-init", choices=("kaiming", "zeros"), default="kaiming")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--trainer", action="store_true", help="train with transformers.Trainer instead of the plain loop")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="compile each decoder layer with mode='reduce-overhead' (CUDA graphs; plain loop, CUDA only); "
                        "default: on where it applies (CUDA, no --trainer or --compile, one micro-batch a step)")
    args = p.parse_args(argv)
    graphs_apply = args.device == "cuda" and not (args.trainer or args.compile or args.grad_accum != 1)
    if args.cuda_graphs is None:  # eager small layers are host-bound on a GPU (README, "Host time")
        args.cuda_graphs = graphs_apply
    if args.cuda_graphs and not graphs_apply:
        # one micro-batch a step: a replay overwrites the previous replay's outputs, which autograd may
        # have taken as the parameters' .grad, so gradients must not accumulate over several replays
        p.error("--cuda-graphs needs --device cuda and the plain loop with one micro-batch a step, without --trainer "
                f"or --compile (got device {args.device}, trainer {args.trainer}, compile {args.compile}, "
                f"grad-accum {args.grad_accum})")
    return args


# -- data: characters of the Python standard library's source ------------------------------------
def corpus_tokens(max_chars: int = 2_000_000) -> torch.Tensor:
    """ASCII codes (vocabulary 128) of stdlib source files, concatenated: [N] int64."""
    root = Path(os.__file__).parent
    text, size = [], 0
    for path in sorted(root.glob("*.py")):
        chunk = path.read_text(encoding="utf-8", errors="ignore")
        text.append(chunk)
        size += len(chunk)
        if size >= max_chars:
            break
    data = torch.frombuffer(bytearray("".join(text).encode("ascii", errors="ignore")), dtype=torch.uint8)
    return data.long().clamp_max(127)


def batches(tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=generator)
        yield torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


# -- model and optimizer --------------------------------------------------------------------------
def build(args) -> tuple[torch.nn.Module, TopologyOptimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 32), num_key_value_heads=max(1, args.hidden // 32),
        vocab_size=128, max_position_embeddings=max(128, args.seq_len), tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    sparsify(model, layers=args.sparse_layers, components="mlp", density=args.density, block_size=args.block_size,
             seed=args.seed)
    model.to(args.device)
    topology = TopologyConfig(
        score_every=args.score_every, update_every=args.update_every, prune_fraction=args.prune_fraction,
        swap_threshold=args.swap_threshold, epsilon=args.epsilon, scorer=args.scorer, grow_init=args.grow_init,
        seed=args.seed,
    )
    inner = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    opt = TopologyOptimizer(inner, model, topology)
    warmup = max(1, args.steps // 20)
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))  # noqa: E731
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def train_loop(args, model, opt, scheduler, data) -> list[tuple[int, float]]:
    forward = torch.compile(model) if args.compile else model
    if args.cuda_graphs:
        log.info("compiled into CUDA graphs: %s", ", ".join(compile_repeated_layers(model)))
    losses, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        total = 0.0
        for _ in range(args.grad_accum):
            ids = next(data).to(args.device)
            if args.cuda_graphs:  # a new step: the previous step's graph outputs are dead
                torch.compiler.cudagraph_mark_step_begin()
            loss = forward(input_ids=ids, labels=ids).loss / args.grad_accum
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        scheduler.step()
        opt.zero_grad()
        losses.append((step, total))
        if step % 25 == 0 or step == args.steps:
            log.info("step %d  loss %.3f  lr %.2e  %.1fs", step, total, scheduler.get_last_lr()[0], time.perf_counter() - start)
    return losses


def train_trainer(args, model, opt, scheduler, tokens) -> list[tuple[int, float]]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    n = args.steps * args.batch_size * args.grad_accum
    rows = next(batches(tokens, n, args.seq_len, args.seed))
    dataset = [{"input_ids": r, "labels": r} for r in rows]
    losses = []

    class KeepLosses(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append((state.global_step, logs["loss"]))

    training = TrainingArguments(
        output_dir=str(Path(args.out) / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, max_grad_norm=1.0, logging_steps=10, save_strategy="no",
        report_to="none", use_cpu=args.device == "cpu", disable_tqdm=True, seed=args.seed,
        torch_compile=args.compile,
    )
    Trainer(model=model, args=training, train_dataset=dataset, optimizers=(opt, scheduler),
            callbacks=[KeepLosses()]).train()
    return losses


def churn(history) -> float:
    """Of the blocks grown at one decision, the fraction pruned again at the next one (oscillation)."""
    grown_at, again, total = {}, 0, 0
    for d in sorted(history, key=lambda d: d.step):
        previous = grown_at.get(d.layer, set())
        again += sum((r, c) in previous for r, _, c in d.pruned)
        total += len(previous)
        grown_at[d.layer] = {(r, c) for r, _, c in d.grown}
    return again / total if total else 0.0


def worst_spike(losses, decision_steps, before: int = 20, after: int = 10) -> float:
    """Max over decisions of (max loss in the ``after`` steps following it) / (mean loss of the ``before`` steps)."""
    by_step = dict(losses)
    worst = 0.0
    for step in decision_steps:
        prior = [by_step[s] for s in range(step - before + 1, step + 1) if s in by_step]
        later = [by_step[s] for s in range(step + 1, step + after + 1) if s in by_step]
        if prior and later:
            worst = max(worst, max(later) / (sum(prior) / len(prior)))
    return worst


def plot_losses(losses, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([s for s, _ in losses], [v for _, v in losses])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, opt, scheduler = build(args)
    print(sparsity_table(model))

    decisions = open(out / "decisions.jsonl", "w")

    def write_decision(step, metrics, records):
        # forward to TensorBoard here instead: writer.add_scalar(name, value, step) for each metric
        decisions.write(json.dumps({"step": step, **metrics}) + "\n")
        decisions.flush()

    opt.add_callback(write_decision)
    watched_name, watched = next(iter(opt.layers.items()))
    before = snapshot(model)
    plot_block_mask(watched, out / "mask_before.png", title=f"{watched_name} at step 0")

    start = time.perf_counter()
    if args.trainer:
        losses = train_trainer(args, model, opt, scheduler, corpus_tokens())
    else:
        losses = train_loop(args, model, opt, scheduler, batches(corpus_tokens(), args.batch_size, args.seq_len, args.seed))
    seconds = time.perf_counter() - start
    decisions.close()

    report = topology_report(model, opt)
    changes = diff(before, snapshot(model))
    plot_block_mask(watched, out / "mask_after.png", title=f"{watched_name} at step {opt.global_step}")
    plot_swap_rate(opt.history, out / "swap_rate.png")
    plot_losses(losses, out / "loss.png")
    rates = [rate for _, rate in swap_rates(opt.history)]
    summary = {
        "steps": opt.global_step, "seconds": round(seconds, 1), "final_loss": losses[-1][1] if losses else None,
        "decisions": len(rates), "swap_rate_per_decision": [round(r, 4) for r in rates],
        "swap_rate_mean": sum(rates) / len(rates) if rates else 0.0,
        "explored_swaps": sum(d.explored for d in opt.history),
        "grown_then_pruned_at_next_decision": churn(opt.history),
        "worst_loss_spike_after_a_decision": worst_spike(losses, [s for s, _ in swap_rates(opt.history)]),
        "blocks_changed_since_start": {n: d.counts for n, d in changes.items()},
        "report": list(report), "config": vars(args),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(report)
    print(f"swap rate per decision: {', '.join(f'{100 * r:.2f}%' for r in rates)}; "
          f"grown blocks pruned again at the next decision: {100 * summary['grown_then_pruned_at_next_decision']:.1f}%")
    print(f"{opt.global_step} steps in {seconds:.0f}s; plots and logs in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
