"""GPT training steps: ``fastgpt.GPT`` against the same model built from plain torch modules
(:class:`fastgpt.tools.bench.nanogpt.NanoGPT`, nanoGPT's code), eager and compiled."""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, Optional

import torch
from torch import Tensor, nn

from fastgpt import backends
from fastgpt.tools.bench import timing as _timing
from fastgpt.tools.bench.op_cases import Unavailable, set_compile_limits
from fastgpt.tools.bench.nanogpt import NanoGPT


GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, dropout=0.0, bias=True)
# nanoGPT's CPU example (config/train_shakespeare_char.py with the README's CPU overrides)
GPT_CPU_SMALL = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, dropout=0.0, bias=True)
GPT_IMPLS = ("fastgpt", "fastgpt-compile", "torch-eager", "torch-compile")


def _gpt_module():
    try:
        return importlib.import_module("fastgpt.model")
    except ModuleNotFoundError as exc:
        if exc.name != "fastgpt.model":
            raise
        raise Unavailable("fastgpt.model does not exist yet (fastgpt.GPT is being written)") from None


def _adamw(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """nanoGPT's optimizer for either model: decay on 2-D parameters, fused on CUDA where available."""
    import inspect

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), **({"fused": True} if fused else {}))


@dataclass
class GptStep:
    """One training step of one implementation, ready to time; ``step()`` returns the loss."""

    impl: str
    step: Callable[[], Tensor]
    context: Callable[[], ContextManager]
    tokens: int
    flops_per_step: float
    n_params: int
    first_loss: float
    description: str
    label: str = ""


def prepare_gpt_step(
    impl: str,
    device: torch.device,
    *,
    config: Optional[Dict[str, object]] = None,
    batch: int = 8,
    seqlen: Optional[int] = None,
    amp_dtype: Optional[torch.dtype] = torch.bfloat16,
    optimizer: bool = True,
    seed: int = 0,
) -> GptStep:
    """Build ``impl`` (``fastgpt``, ``fastgpt-compile``, ``torch-eager``, ``torch-compile``) of a GPT.

    Every implementation starts from the same weights (fastgpt.GPT initialised with ``seed``, copied
    into the plain-torch :class:`fastgpt.tools.bench.nanogpt.NanoGPT`) and the same batch. A step is forward (under autocast to ``amp_dtype``
    when given), backward, and with ``optimizer`` an AdamW step (fused on CUDA) and zero_grad.
    fastgpt runs with ``use_backend("auto", strict=True)``: on CUDA tensors every op must get its
    GPU kernel or the step raises (reported Unavailable); on CPU tensors ``use_backend("reference")``.
    The first step runs here (compilation happens there) and its loss is returned for cross-checks.
    """
    if impl not in GPT_IMPLS:
        raise ValueError(f"unknown GPT implementation {impl!r}; expected one of {', '.join(GPT_IMPLS)}")
    mod = _gpt_module()
    cfg = mod.GPTConfig(**(config or GPT2_124M))
    t = seqlen or cfg.block_size
    torch.manual_seed(seed)
    model: nn.Module = mod.GPT(cfg)
    n_params = model.get_num_params()
    if impl.startswith("torch"):
        plain = NanoGPT(cfg)
        plain.load_state_dict(model.state_dict())
        model = plain
    model = model.to(device).train()
    opt = _adamw(model, device) if optimizer else None
    if impl.endswith("compile"):
        set_compile_limits()
        model = torch.compile(model)
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.randint(cfg.vocab_size, (batch, t), generator=g).to(device)
    targets = torch.randint(cfg.vocab_size, (batch, t), generator=g).to(device)
    if impl.startswith("fastgpt"):
        backend = "auto" if device.type == "cuda" else "reference"
        context: Callable[[], ContextManager] = lambda: backends.use_backend(backend, strict=True)  # noqa: E731
    else:
        context = contextlib.nullcontext

    def step() -> Tensor:
        if amp_dtype is not None:
            with torch.autocast(device.type, dtype=amp_dtype):
                _, loss = model(idx, targets)
        else:
            _, loss = model(idx, targets)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        return loss

    try:
        with context():
            first = float(step().detach())
    except backends.BackendUnavailableError as exc:
        raise Unavailable(str(exc)) from None
    flops = _timing.gpt_flops_per_token(n_params, cfg.n_layer, cfg.n_embd, t) * batch * t
    amp = f"{str(amp_dtype).replace('torch.', '')} autocast" if amp_dtype is not None else "float32"
    desc = f"n_layer={cfg.n_layer} n_embd={cfg.n_embd} n_head={cfg.n_head} B={batch} T={t} {amp}" + (", AdamW" if optimizer else ", fwd+bwd")
    short = {"bfloat16 autocast": "bf16", "float16 autocast": "fp16", "float32": "fp32"}.get(amp, amp)
    label = f"L{cfg.n_layer} C{cfg.n_embd} B{batch} T{t} {short}"
    return GptStep(impl, step, context, batch * t, flops, n_params, first, desc, label)


def gpt_record(step: GptStep, timing: _timing.Timing, ms: float, roofline: Optional[_timing.Roofline], device_name: str) -> Dict[str, object]:
    """Tokens/s, achieved TFLOP/s and MFU of a timed training step (``ms`` per step)."""
    tflops = step.flops_per_step / (ms * 1e-3) / 1e12
    peak = _timing.nominal_peak_tflops(device_name) if device_name != "cpu" else None
    return {
        "op": "gpt",
        "impl": step.impl,
        "group": f"gpt step {step.description}",
        "mode": "train step",
        "shape": step.label,
        "description": step.description,
        "ms": ms,
        "timing": timing.as_dict(),
        "tokens_per_step": step.tokens,
        "tokens_per_s": step.tokens / (ms * 1e-3),
        "flops_per_step": step.flops_per_step,
        "TFLOP/s": tflops,
        "mfu_pct": 100.0 * tflops / peak if peak else None,
        "mfu_peak_tflops": peak,
        "pct_of_matmul": roofline.pct_of_matmul(tflops) if roofline is not None else None,
        "first_loss": step.first_loss,
        "n_params": step.n_params,
    }
