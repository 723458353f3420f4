"""The nanoGPT model the tests compare with (fastgpt.tools.bench.nanogpt, under its test names) and the parity
rule applied to whole models."""

from fastgpt.tools.bench.nanogpt import MLP, Block, CausalSelfAttention, LayerNorm  # noqa: F401
from fastgpt.tools.bench.nanogpt import NanoConfig as RefConfig  # noqa: F401
from fastgpt.tools.bench.nanogpt import NanoGPT as RefGPT  # noqa: F401


def check_model_parity(name, model, base, ref, run, dtype=None):
    """The parity rule (fastgpt.testing) for a whole model, forward outputs and every parameter's gradient.

    ``model`` (the one under test) and ``base`` (plain torch) run in the same precision, ``ref`` is the
    float64 copy; all three hold the same weights under the same parameter names. ``run(m)`` returns a
    dict of output tensors including a scalar "loss", which is backpropagated. Returns the Parity list.
    """
    from fastgpt.testing import assert_parity

    results = {}
    for tag, m in (("out", model), ("base", base), ("ref", ref)):
        m.zero_grad(set_to_none=True)
        outs = run(m)
        outs["loss"].backward()
        grads = {n: p.grad for n, p in m.named_parameters()}
        results[tag] = (outs, grads)
    (outs, grads), (bouts, bgrads), (routs, rgrads) = results["out"], results["base"], results["ref"]
    checked = []
    for key in outs:
        checked.append(assert_parity(f"{name} {key}", outs[key].detach(), routs[key].detach(), bouts[key].detach()))
    assert grads.keys() == rgrads.keys() == bgrads.keys(), "the models must have the same parameter names"
    for key, g in grads.items():
        if rgrads[key] is None:
            assert g is None, f"{name}: {key} has a gradient, the reference has none"
            continue
        assert g is not None, f"{name}: {key} got no gradient"
        checked.append(assert_parity(f"{name} grad {key}", g, rgrads[key], bgrads[key], gradient=True))
    return checked


def check_compiled_matches_eager(model, idx, targets, *, backend="inductor", atol=1e-5):
    """torch.compile(model, fullgraph=True): logits, loss and every parameter's gradient equal eager's.

    ``backend="aot_eager"`` traces forward and backward without generating code (fast). Compares with
    rtol 1e-5 and ``atol``.
    """
    import torch

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=backend)
    logits, loss = compiled(idx, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    eager_logits, eager_loss = model(idx, targets)
    eager_loss.backward()
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=atol)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=atol)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=atol, msg=n)
