"""The shipped example trace: a small MoE language model trained here, on CPU, and its routing.

What it is: a Mixtral-architecture model (transformers' ``MixtralForCausalLM``: 4 layers,
hidden 128, 8 experts of FFN 256, top-2, load-balancing loss 0.01) trained from random weights
as a byte-level language model on moesim's own source code and documents (text the project
ships), for a fixed number of steps with a fixed seed. Its routing is captured with
:func:`moesim.traces.capture` on the training batch every ``capture_every`` steps (``step`` is the
training step, so routing drift over training is visible), and after training on held-out text
(moesim's tests), recorded at ``step = steps + 1``.

It is a real PyTorch MoE run, but of a tiny model after minutes of training: its routing is what
this router learned on this text, not a stand-in for a production model's. Regenerate with::

    python -m moesim.traces.example --out scenarios/traces/tiny-mixtral.parquet
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np

from moesim.traces.format import Trace, concat_traces

ROOT = Path(__file__).resolve().parents[2]
TRAIN_GLOBS = ("README.md", "moesim/**/*.py", "scenarios/*.yaml", "moesim/hardware/profiles/*.yaml")
EVAL_GLOBS = ("tests/**/*.py",)


def corpus(globs: tuple[str, ...], root: Path = ROOT) -> tuple[bytes, list[str]]:
    """The bytes of the files matching ``globs`` under ``root`` (sorted), and their names."""
    files = sorted({p for g in globs for p in root.glob(g) if p.is_file()})
    return b"\n\n".join(p.read_bytes() for p in files), [str(p.relative_to(root)) for p in files]


def train_and_capture(
    steps: int = 600,
    capture_every: int = 50,
    seq_len: int = 128,
    batch_size: int = 16,
    eval_sequences: int = 192,
    seed: int = 0,
    root: Path = ROOT,
    log: bool = True,
) -> Trace:
    """Train the model and return its routing trace (see the module docstring)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from moesim.traces.recorder import capture

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(seed)
    train_bytes, train_files = corpus(TRAIN_GLOBS, root)
    eval_bytes, eval_files = corpus(EVAL_GLOBS, root)
    data = torch.as_tensor(np.frombuffer(train_bytes, dtype=np.uint8).astype(np.int64))
    config = MixtralConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=seq_len,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        tie_word_embeddings=True,
    )
    model = MixtralForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    settings = {
        "what": "tiny Mixtral-architecture byte-level LM trained by moesim.traces.example on CPU",
        "train_text": f"{len(train_files)} moesim files, {len(train_bytes)} bytes, sha256 "
        + hashlib.sha256(train_bytes).hexdigest()[:16],
        "eval_text": f"{len(eval_files)} moesim test files (held out), sha256 "
        + hashlib.sha256(eval_bytes).hexdigest()[:16],
        "steps": steps,
        "capture_every": capture_every,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "eval_step": steps + 1,
        "seed": seed,
        "regenerate": "python -m moesim.traces.example --out <file>",
    }
    parts = []
    start = time.perf_counter()
    model.train()
    next_seq = 0
    for step in range(steps + 1):
        offsets = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
        batch = torch.stack([data[o : o + seq_len] for o in offsets])
        if step % capture_every == 0 or step == steps:
            with capture(
                model,
                steps="manual",
                model_name="tiny-mixtral",
                settings=settings,
                first_seq=next_seq,
            ) as rec:
                rec.step = step
                loss = model(input_ids=batch, labels=batch).loss
            parts.append(rec.trace())
            next_seq = rec.next_seq
            if log:
                print(
                    f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - start:6.1f} s"
                )
        else:
            loss = model(input_ids=batch, labels=batch).loss
        if step == steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ev = torch.as_tensor(np.frombuffer(eval_bytes, dtype=np.uint8).astype(np.int64))
    n_eval = min(eval_sequences, len(ev) // seq_len)
    seqs = ev[: n_eval * seq_len].reshape(n_eval, seq_len)
    with (
        torch.no_grad(),
        capture(
            model, steps="manual", model_name="tiny-mixtral", settings=settings, first_seq=next_seq
        ) as rec,
    ):
        rec.step = steps + 1
        for i in range(0, n_eval, batch_size):
            out = model(input_ids=seqs[i : i + batch_size], labels=seqs[i : i + batch_size])
    parts.append(rec.trace())
    if log:
        print(
            f"held-out loss {out.loss.item():.3f}; {n_eval} sequences captured at step {steps + 1}"
        )
    return concat_traces(parts)


def main() -> None:
    """Command-line entry: ``python -m moesim.traces.example --out FILE``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="trace file to write")
    ap.add_argument("--steps", type=int, default=600, help="training steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    trace = train_and_capture(steps=args.steps, seed=args.seed)
    trace.write(args.out)
    print(f"wrote {args.out}: {args.out.stat().st_size / 1e6:.2f} MB, {trace.rows:,} rows")


if __name__ == "__main__":
    main()
