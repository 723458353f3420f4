"""Memory of fastgpt.linear_cross_entropy (reference path) against eager (matmul + F.cross_entropy).

    python benchmarks/linear_ce_memory.py [--tokens 8192] [--vocab 50304 128256] [--dim 768] [--device meta|cpu]
        [--dtype float32|bfloat16] [--accum-dtype bfloat16] [--json]

A forward + backward of the mean loss is run inside :func:`fastgpt.testing.allocation_recorder`,
which records every tensor allocated at the dispatcher: the largest one, and the peak of the bytes
alive at once (inputs and parameters excluded, gradients included). On ``--device meta`` (default)
nothing is computed or allocated, so the figures of an 8192 x 128256 vocabulary cost no memory and no
time; the allocation sizes are the same as on a CPU (tests/test_cross_entropy.py checks the
recorder on real CPU tensors). Not timed: this is the memory side of the issue's target (peak memory
<= 25% of eager's), measured on the CPU path.
"""

import argparse
import json
import warnings

import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import backends
from fastgpt.testing import allocation_recorder


def measure(tokens: int, vocab: int, dim: int, device: str, dtype: torch.dtype, accum_dtype=None) -> dict:
    row = {"tokens": tokens, "vocab": vocab, "dim": dim, "device": device, "dtype": str(dtype).replace("torch.", ""),
           "accum_dtype": str(accum_dtype).replace("torch.", "") if accum_dtype else "default"}
    for name in ("eager", "fastgpt"):
        x = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(vocab, dim, device=device, dtype=dtype, requires_grad=True)
        target = torch.zeros(tokens, dtype=torch.long, device=device)
        with warnings.catch_warnings(), backends.use_backend("reference"):
            warnings.simplefilter("ignore")
            with allocation_recorder() as rec:
                if name == "eager":
                    loss = F.cross_entropy(x @ w.t(), target)
                else:
                    loss = fastgpt.linear_cross_entropy(x, w, target, accum_dtype=accum_dtype)
                loss.backward()
                del loss
        row[name] = {"largest_bytes": rec.largest, "largest_shape": list(rec.largest_shape), "peak_bytes": rec.peak}
    row["peak_ratio"] = row["fastgpt"]["peak_bytes"] / row["eager"]["peak_bytes"]
    row["largest_ratio"] = row["fastgpt"]["largest_bytes"] / row["eager"]["largest_bytes"]
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, nargs="+", default=[50304, 128256])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--device", choices=("meta", "cpu"), default="meta")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--accum-dtype", choices=("bfloat16",), default=None,
                   help="fastgpt's accum_dtype (dweight summed in bfloat16 across chunks; needs --dtype bfloat16)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    for name, value in (("--tokens", a.tokens), ("--dim", a.dim), *(("--vocab", v) for v in a.vocab)):
        if value < 1:
            p.error(f"{name} must be >= 1; got {value}")
    if a.accum_dtype and a.dtype != a.accum_dtype:
        p.error(f"--accum-dtype {a.accum_dtype} needs --dtype {a.accum_dtype}")
    accum = getattr(torch, a.accum_dtype) if a.accum_dtype else None
    rows = [measure(a.tokens, v, a.dim, a.device, getattr(torch, a.dtype), accum) for v in a.vocab]
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    mib = 2**20
    for r in rows:
        e, f = r["eager"], r["fastgpt"]
        print(f"T={r['tokens']} V={r['vocab']} D={r['dim']} {r['dtype']} (accum {r['accum_dtype']}) on {r['device']}: "
              f"largest tensor eager {e['largest_bytes'] / mib:.1f} MiB {e['largest_shape']} vs fastgpt {f['largest_bytes'] / mib:.1f} MiB "
              f"{f['largest_shape']}; peak alive eager {e['peak_bytes'] / mib:.1f} MiB vs fastgpt {f['peak_bytes'] / mib:.1f} MiB "
              f"({100 * r['peak_ratio']:.1f}%)")


if __name__ == "__main__":
    main()
