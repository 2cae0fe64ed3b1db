"""``moesim trace capture``: run a Hugging Face MoE model on text and record its routing.

Needs the ``trace`` extra (torch, transformers). The model is a Hub id or a local directory;
weights load with ``from_pretrained`` (a directory holding only ``config.json`` gets random
weights, which is what the tests use). Text is a file or a directory of ``.txt``/``.md`` files,
tokenised with the model's tokenizer, or as UTF-8 bytes when the model has none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moesim.traces.format import Trace, TraceError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".yaml")


def read_text(src: Path) -> tuple[str, list[str]]:
    """Text of a file, or of the text files under a directory (sorted); and their names."""
    if src.is_file():
        return src.read_text(errors="replace"), [src.name]
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise TraceError(src, f"no text files ({', '.join(TEXT_SUFFIXES)}) in this directory")
        return "\n\n".join(p.read_text(errors="replace") for p in files), [
            str(p.relative_to(src)) for p in files
        ]
    raise TraceError(src, "no such file or directory")


def tokenize(text: str, tokenizer: Any, vocab_size: int) -> np.ndarray:
    """Token ids of ``text``: the tokenizer's, or UTF-8 bytes (folded into the vocabulary)."""
    if tokenizer is not None:
        return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    return np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int64) % vocab_size


def load_model(ref: str, device: str, dtype: str) -> tuple[Any, Any]:
    """``(model, tokenizer or None)`` for a Hub id or local directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    config = AutoConfig.from_pretrained(ref)
    auto = (
        AutoModelForSeq2SeqLM
        if getattr(config, "is_encoder_decoder", False)
        else AutoModelForCausalLM
    )
    path = Path(ref)
    has_weights = not path.is_dir() or any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    if has_weights:
        model = auto.from_pretrained(ref, dtype=torch_dtype)
    else:
        torch.manual_seed(0)
        model = auto.from_config(config)
        model = model.to(torch_dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    model = model.to(device)  # type: ignore[arg-type]
    return model.eval(), tokenizer


def capture_text(
    model_ref: str,
    text: Path,
    device: str = "cpu",
    dtype: str = "fp32",
    max_tokens: int = 8192,
    seq_len: int = 512,
    batch_size: int = 4,
    logits: bool = False,
    progress: Any = None,
) -> Trace:
    """Run ``model_ref`` over ``text`` (sequences of ``seq_len``) and return the routing trace."""
    import torch

    from moesim.traces.recorder import capture

    model, tokenizer = load_model(model_ref, device, dtype)
    body, names = read_text(text)
    vocab = int(getattr(model.config, "vocab_size", 256))
    ids = tokenize(body, tokenizer, vocab)[:max_tokens]
    n_seq = len(ids) // seq_len
    if n_seq == 0:
        raise TraceError(text, f"{len(ids)} tokens: fewer than one sequence of {seq_len}")
    seqs = torch.as_tensor(ids[: n_seq * seq_len].reshape(n_seq, seq_len), device=device)
    settings = {
        "text": names[:50],
        "text_files": len(names),
        "tokens": int(n_seq * seq_len),
        "seq_len": seq_len,
        "dtype": dtype,
        "device": device,
        "tokenizer": "model" if tokenizer is not None else "utf-8 bytes",
    }
    encdec = bool(getattr(model.config, "is_encoder_decoder", False))
    with (
        torch.no_grad(),
        capture(model, logits=logits, model_name=model_ref, settings=settings) as rec,
    ):
        for start in range(0, n_seq, batch_size):
            batch = seqs[start : start + batch_size]
            if encdec:
                model(input_ids=batch, decoder_input_ids=batch[:, :1])
            else:
                model(input_ids=batch)
            if progress is not None:
                progress(len(batch))
    return rec.trace()
