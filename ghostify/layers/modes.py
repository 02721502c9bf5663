"""Which kind of run a layer's forward is in: compiled or exported, traced, or plain eager."""

from __future__ import annotations

import torch


def compiling() -> bool:
    """True under torch.compile, torch.export and the ONNX exporters (not under fx tracing)."""
    # torch.compiler.is_compiling is torch >= 2.3; torch._dynamo's (imported only then) before.
    is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
    return bool(is_compiling() or torch.onnx.is_in_onnx_export())


def eager_inference() -> bool:
    """Whether ops run eagerly with autograd off (no_grad, inference_mode): where a forward may
    use out= writes and in-place ops that autograd, tracers and exporters do not take."""
    return not (torch.is_grad_enabled() or compiling() or torch.jit.is_tracing() or _fx_tracing())


def recorded() -> bool:
    """Whether something records or transforms the ops rather than just running them:
    compilers and exporters, the jit and fx tracers, functorch transforms, or saved-tensor hooks
    (activation checkpointing, offloading), which must see every tensor kept for backward."""
    return bool(
        compiling()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or _fx_tracing()
        or torch._C._are_functorch_transforms_active()
        or torch._C._autograd._top_saved_tensors_default_hooks(True) is not None
    )


def _fx_tracing() -> bool:
    from torch.fx import _symbolic_trace

    # is_fx_symbolic_tracing is the newer name; is_fx_tracing warns on torch that has it.
    check = (
        getattr(_symbolic_trace, "is_fx_symbolic_tracing", None) or _symbolic_trace.is_fx_tracing
    )
    return bool(check())
