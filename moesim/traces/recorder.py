"""Capture routing from a running PyTorch MoE model through forward hooks on its routers.

::

    from moesim.traces import capture

    with capture(model, steps="manual") as rec:
        for step, batch in enumerate(loader):
            rec.step = step                  # training step: routing drift over training shows
            loss = model(**batch).loss
            ...
    rec.trace().write("trace.parquet")

Routers are found by class (transformers 5.x ``*TopKRouter`` / ``*TopkRouter`` modules and
Switch Transformers' ``*Top1Router``), by a ``gate``/``router`` linear layer inside an MoE block
(transformers 4.x), or given explicitly (``routers=``) with an ``interpret`` function for a
custom router. What a router returns is read as:

- ``(logits, top-k weights, top-k indices)``: transformers 5.x (Mixtral, Qwen2/3-MoE, OLMoE,
  DeepSeek-V2/V3, GPT-OSS, Granite-MoE);
- ``(one-hot dispatch mask, top-1 prob, logits)``: Switch Transformers; the choice is the arg-max
  of the logits and a choice whose mask row is empty was dropped for capacity;
- ``(probs, routing_map)`` with a boolean ``[tokens, experts]`` map: Megatron-style;
- logits alone (a 4.x ``nn.Linear`` gate): top-k of the softmax, renormalised when the model's
  config says ``norm_topk_prob``.

Rows map to (sequence, position) from the model's own inputs: a hook on the top-level forward
reads the batch shape, the attention mask (padding is not recorded) and the KV-cache offset
(:func:`cache_offset`: ``cache_position``, the cache's length, the mask or ``position_ids``, as
each transformers version passes it), so that generation with a KV cache records real positions
and keeps the sequence ids.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from moesim.traces.format import Trace, TraceError, TraceMeta

ROUTER_CLASS = re.compile(r"(TopK|Topk|Top1)Router$")
MOE_BLOCK = re.compile(r"moe|sparse", re.IGNORECASE)


@dataclass
class RouterOutput:
    """One router call as numpy: experts, weights, dropped ``[n, k]``; logits ``[n, E]``."""

    experts: np.ndarray
    weights: np.ndarray | None
    dropped: np.ndarray | None
    logits: np.ndarray | None


Interpreter = Callable[[Any, Any, int], RouterOutput]


def _np(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy() if t.is_floating_point() else t.detach().cpu().numpy()


def interpret_output(out: Any, module: Any, top_k: int) -> RouterOutput:
    """Read a router's return value (the forms in the module docstring)."""
    import torch

    if isinstance(out, tuple) and len(out) == 3 and not out[2].is_floating_point():
        logits, weights, idx = out
        return RouterOutput(
            experts=_np(idx).reshape(-1, idx.shape[-1]).astype(np.int16),
            weights=_np(weights).reshape(-1, weights.shape[-1]).astype(np.float32),
            dropped=None,
            logits=_np(logits).reshape(-1, logits.shape[-1]).astype(np.float32),
        )
    if isinstance(out, tuple) and len(out) == 3 and not out[0].is_floating_point():
        mask, prob, logits = out  # Switch Transformers
        n_exp = logits.shape[-1]
        flat_logits = _np(logits).reshape(-1, n_exp).astype(np.float32)
        kept = _np(mask).reshape(-1, n_exp).sum(axis=1) > 0
        return RouterOutput(
            experts=flat_logits.argmax(axis=1).astype(np.int16)[:, None],
            weights=_np(prob).reshape(-1, 1).astype(np.float32),
            dropped=~kept[:, None],
            logits=flat_logits,
        )
    if isinstance(out, tuple) and len(out) == 2 and out[1].dtype == torch.bool:
        probs, routing_map = out  # Megatron-style (probs, routing_map)
        rmap = _np(routing_map).reshape(-1, routing_map.shape[-1])
        counts = rmap.sum(axis=1)
        if not np.all(counts == counts[0]):
            raise TraceError(None, "routing map rows choose different numbers of experts")
        idx = np.nonzero(rmap)[1].reshape(len(rmap), -1).astype(np.int16)
        p = _np(probs).reshape(rmap.shape)
        return RouterOutput(
            experts=idx,
            weights=np.take_along_axis(p, idx.astype(np.intp), axis=1).astype(np.float32),
            dropped=None,
            logits=None,
        )
    if torch.is_tensor(out) and out.is_floating_point():
        logits = out.reshape(-1, out.shape[-1]).float()
        probs = torch.softmax(logits, dim=-1)
        w, idx = torch.topk(probs, top_k, dim=-1)
        if getattr(module, "_moesim_norm_topk", False):
            w = w / w.sum(dim=-1, keepdim=True)
        return RouterOutput(
            experts=_np(idx).astype(np.int16),
            weights=_np(w).astype(np.float32),
            dropped=None,
            logits=_np(logits).astype(np.float32),
        )
    raise TraceError(
        None,
        f"cannot read the output of router {type(module).__name__} "
        f"({type(out).__name__}); pass interpret= to moesim.traces.capture",
    )


def _config(model: Any) -> Any:
    return getattr(model, "config", None)


def _config_int(cfg: Any, *names: str) -> int | None:
    for name in names:
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def find_routers(model: Any) -> list[tuple[str, Any]]:
    """``(name, module)`` of every router of ``model``, in forward (module) order."""
    import torch

    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if ROUTER_CLASS.search(type(mod).__name__)
    ]
    if found:
        return found
    cfg = _config(model)
    n_exp = _config_int(cfg, "num_local_experts", "num_experts", "n_routed_experts")
    for name, mod in model.named_modules():
        if not MOE_BLOCK.search(type(mod).__name__):
            continue
        for child_name in ("gate", "router"):
            child = getattr(mod, child_name, None)
            if isinstance(child, torch.nn.Linear) and child.out_features == n_exp:
                norm = bool(getattr(cfg, "norm_topk_prob", False))
                object.__setattr__(child, "_moesim_norm_topk", norm)
                found.append((f"{name}.{child_name}", child))
    return found


def cache_offset(kwargs: dict[str, Any], length: int, mask: Any = None) -> int:
    """KV-cache slot of the first input column of a top-level forward call.

    transformers versions pass it differently, so the first that is present wins:
    ``cache_position`` (4.36 to 5.23), the cache object's length before this call
    (``past_key_values``, or ``cache`` from 5.24), a 2-D attention mask longer than the
    input (it covers the cached columns too), and the largest first ``position_ids`` entry
    (left padding lowers the others). 0 without any of them: a fresh, uncached forward.
    """
    cache_pos = kwargs.get("cache_position")
    if cache_pos is not None and cache_pos.numel():
        return int(cache_pos.reshape(-1)[0])
    for name in ("past_key_values", "cache"):
        past = kwargs.get(name)
        if past is not None and hasattr(past, "get_seq_length"):
            return int(past.get_seq_length())
    if mask is not None and int(mask.shape[-1]) > length:
        return int(mask.shape[-1]) - length
    pos = kwargs.get("position_ids")
    if pos is not None and pos.dim() >= 1 and pos.numel():
        return int(pos.reshape(-1, pos.shape[-1])[:, 0].max())
    return 0


class RoutingRecorder:
    """Collects router outputs while attached to a model; build the trace with :meth:`trace`.

    Args:
        model: A PyTorch module (a transformers MoE model or any model with routers).
        routers: ``(name, module)`` pairs to hook instead of the auto-detected ones.
        interpret: Reads a custom router's output (``(output, module, top_k) -> RouterOutput``).
        steps: ``forward`` (each top-level forward call is a step, e.g. a decode step) or
            ``manual`` (set :attr:`step`, e.g. to the training step).
        logits: Record the full router logits too.
        model_name: Name for the trace metadata (default: the config's ``_name_or_path``).
        settings: Extra capture settings for the metadata (text, dtype, ...).
        first_seq: Id of the first sequence recorded (to continue numbering across captures).
    """

    def __init__(
        self,
        model: Any,
        routers: list[tuple[str, Any]] | None = None,
        interpret: Interpreter | None = None,
        steps: Literal["forward", "manual"] = "forward",
        logits: bool = False,
        model_name: str | None = None,
        settings: dict[str, Any] | None = None,
        first_seq: int = 0,
    ) -> None:
        self.model = model
        self.routers = routers if routers is not None else find_routers(model)
        if not self.routers:
            raise TraceError(
                None,
                f"no MoE router found in {type(model).__name__}; pass routers=[(name, module)]",
            )
        self.interpret = interpret or interpret_output
        self.steps, self.keep_logits = steps, logits
        cfg = _config(model)
        self.top_k = _config_int(cfg, "num_experts_per_tok", "moe_topk", "top_k") or 1
        first = self.routers[0][1]
        self.num_experts = (
            getattr(first, "num_experts", None)
            or getattr(first, "out_features", None)
            or _config_int(cfg, "num_local_experts", "num_experts", "n_routed_experts")
        )
        self.model_name = model_name or str(
            getattr(cfg, "_name_or_path", "") or type(model).__name__
        )
        self.settings = dict(settings or {})
        self.step = 0
        self._forwards = 0
        self.next_seq = first_seq
        self._seq_ids: np.ndarray = np.zeros(0, dtype=np.int64)
        self._offset = 0
        self._mask: np.ndarray | None = None
        self._chunks: list[dict[str, Any]] = []
        self._handles: list[Any] = []

    # -- hooks ---------------------------------------------------------------------------------

    def attach(self) -> RoutingRecorder:
        """Register the hooks (done by :func:`capture`)."""
        self._handles.append(self.model.register_forward_pre_hook(self._on_model, with_kwargs=True))
        for layer, (_, mod) in enumerate(self.routers):
            self._handles.append(mod.register_forward_hook(self._router_hook(layer)))
        return self

    def detach(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def next_step(self) -> None:
        """Advance the step counter (``steps="manual"``)."""
        self.step += 1

    def _on_model(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            return
        batch, length = int(ids.shape[0]), int(ids.shape[1])
        mask = kwargs.get("attention_mask")
        mask = mask if mask is not None and getattr(mask, "dim", lambda: 0)() == 2 else None
        offset = cache_offset(kwargs, length, mask)
        if offset == 0 or len(self._seq_ids) != batch:
            self._seq_ids = np.arange(self.next_seq, self.next_seq + batch)
            self.next_seq += batch
        self._offset = offset
        self._mask = None
        if mask is not None:
            self._mask = mask[:, -length:].detach().cpu().numpy().astype(bool)
        if self.steps == "forward":
            self.step = self._forwards
        self._forwards += 1

    def _router_hook(self, layer: int) -> Callable[..., None]:
        def hook(module: Any, inputs: tuple[Any, ...], out: Any) -> None:
            got = self.interpret(out, module, self.top_k)
            self._record(layer, got)

        return hook

    def _record(self, layer: int, got: RouterOutput) -> None:
        n = len(got.experts)
        batch = max(len(self._seq_ids), 1)
        if n % batch:
            raise TraceError(
                None, f"router of layer {layer} saw {n} tokens, not a multiple of {batch}"
            )
        length = n // batch
        seq = np.repeat(self._seq_ids if len(self._seq_ids) else np.zeros(1, np.int64), length)
        pos = np.tile(np.arange(length) + self._offset, batch)
        keep = (
            self._mask.reshape(-1)
            if self._mask is not None and self._mask.size == n
            else np.ones(n, dtype=bool)
        )
        self._chunks.append(
            {
                "step": np.full(int(keep.sum()), self.step, dtype=np.int32),
                "layer": np.full(int(keep.sum()), layer, dtype=np.int16),
                "seq": seq[keep].astype(np.int32),
                "pos": pos[keep].astype(np.int32),
                "experts": got.experts[keep],
                "weights": None if got.weights is None else got.weights[keep],
                "dropped": None if got.dropped is None else got.dropped[keep],
                "logits": None if got.logits is None or not self.keep_logits else got.logits[keep],
            }
        )

    # -- result --------------------------------------------------------------------------------

    @property
    def assignments(self) -> int:
        """Token-expert assignments recorded so far."""
        return sum(c["experts"].size for c in self._chunks)

    def trace(self) -> Trace:
        """Everything recorded so far, as a :class:`Trace`."""
        if not self._chunks:
            raise TraceError(None, "nothing was recorded: the model's routers never ran")
        k = self._chunks[0]["experts"].shape[1]

        def cat(name: str) -> np.ndarray | None:
            parts = [c[name] for c in self._chunks]
            return None if any(p is None for p in parts) else np.concatenate(parts)

        meta = TraceMeta(
            model=self.model_name,
            num_experts=int(self.num_experts or 0),
            top_k=int(k),
            num_layers=len(self.routers),
            source="capture",
            capture={
                "routers": [name for name, _ in self.routers],
                "steps": self.steps,
                **self.settings,
            },
        )
        experts = cat("experts")
        assert experts is not None
        return Trace(
            meta=meta,
            step=cat("step"),  # type: ignore[arg-type]
            layer=cat("layer"),  # type: ignore[arg-type]
            seq=cat("seq"),  # type: ignore[arg-type]
            pos=cat("pos"),  # type: ignore[arg-type]
            experts=experts,
            weights=cat("weights"),
            dropped=cat("dropped"),
            logits=cat("logits"),
        )


@contextmanager
def capture(model: Any, **kwargs: Any) -> Iterator[RoutingRecorder]:
    """Record the routing of ``model`` inside the ``with`` block.

    Arguments are those of :class:`RoutingRecorder`.
    """
    rec = RoutingRecorder(model, **kwargs).attach()
    try:
        yield rec
    finally:
        rec.detach()
