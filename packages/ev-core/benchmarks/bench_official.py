"""ev's LITv2-S / LIT-S against the papers' official code, side by side in one run (CPU).

The official models are built from a checkout of github.com/ziplab/LITv2 and ziplab/LIT given on
the command line (never vendored here); their CUDA-only DCN extension is replaced by a stand-in
module with the same parameter names that calls ``torchvision.ops.deform_conv2d``. Both models
get the same random weights (ev's state dict loads into the official model strictly; the DTM
offset convs get non-zero weights so the deformable sampling is exercised) and the outputs are
compared before anything is timed.

Every timing is **paired and interleaved**: each repeat runs every candidate once, in rotating
order, and a candidate's ratio is the median over repeats of (baseline time / its time) in that
repeat, so a busy machine slows both sides of a pair alike.

Rows (batch 8, 224², ``--threads`` intra-op threads, eval + ``no_grad``):

* LITv2-S: official fp32 eager (baseline), ev fp32 eager, ev bf16 autocast (also / ev fp32),
  and ev bf16 autocast with the weight-cast cache cleared before every call (what caching the
  bf16 weights gains, :func:`ev_core.layers.onednn.cast_weight`).
* LITv2-S compiled with :func:`ev_core.models.compile_model` (inductor, ``fullgraph=True``,
  freezing, dynamic batch; checked to run batch 32, 1 and 8 after compiling at 8 without
  recompiling), fp32 and under bf16 autocast, paired against ev's eager fp32 / bf16.
* LIT-S: official fp32 eager (baseline), ev fp32 eager.
* DTM 96→192 at 56² (LITv2-S stage 1→2): torchvision ``deform_conv2d`` (fp32; under bf16
  autocast it runs in fp32) vs ev's fast path, fp32 and bf16, and the path ``"auto"`` measures.
* ``torch.profiler`` tables (top 20 ops by self CPU time) of both LITv2-S forwards.
* ``--train``: one training step (forward + backward + AdamW, bf16 autocast, batch 8) of each
  LITv2-S, each in a fresh process, with its peak RSS and the bytes autograd saves.

Usage (official checkouts outside the repository)::

    git clone https://github.com/ziplab/LITv2 /tmp/LITv2
    git clone https://github.com/ziplab/LIT /tmp/LIT
    python packages/ev-core/benchmarks/bench_official.py \\
        --litv2 /tmp/LITv2/classification --lit /tmp/LIT/classification/code_for_lit_s_m_b \\
        --threads 2 --batch 8 --repeats 10 --train --profile --out official_cpu.json

``--skip compile bf16-compile lit dtm`` leaves parts out (compiling takes minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

import ev_core  # noqa: F401  (registers the ev models)
from ev_core.io import write_json
from ev_core.layers.dtm import DTM_PATH_CACHE, DeformableTokenMerging, DeformConv2x2
from ev_core.layers.onednn import clear_weight_cache
from ev_core.repro import environment_info


# ----------------------------------------------------------------------------- official code
class TorchvisionDeformConv2dPack(nn.Module):
    """Stand-in for the official ``DeformConv2dPack`` (CUDA extension): same parameters
    (``weight``, ``bias``, ``conv_offset``), computed by ``torchvision.ops.deform_conv2d``."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
        **_: Any,
    ) -> None:  # fmt: skip
        super().__init__()
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.conv_offset = nn.Conv2d(
            in_channels, 2 * kernel_size * kernel_size, kernel_size, stride, padding
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.deform(x, self.conv_offset(x))

    def deform(self, x: Tensor, offset: Tensor) -> Tensor:
        """torchvision has no bf16/fp16 CPU kernel: such inputs run in fp32, cast back."""
        if x.dtype in (torch.float32, torch.float64):
            return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding)
        out = deform_conv2d(x.float(), offset.float(), self.weight.float(), self.bias.float(),
                            self.stride, self.padding)  # fmt: skip
        return out.to(x.dtype)


class TorchvisionDeformConv2dPackLIT(TorchvisionDeformConv2dPack):
    """The LIT checkout's variant: ``forward(x, return_offset)`` returns ``(out, offset|None)``."""

    def forward(self, x: Tensor, return_offset: bool = False) -> Any:
        offset = self.conv_offset(x)
        return self.deform(x, offset), (offset if return_offset else None)


def load_official(
    folder: Path, module: str, cls: str, dcn: type[nn.Module] = TorchvisionDeformConv2dPack
) -> type[nn.Module]:
    """Import ``models.<module>.<cls>`` from an official checkout's classification folder."""
    if not (folder / "models" / f"{module}.py").is_file():
        sys.exit(f"error: {folder}/models/{module}.py not found (pass the checkout's folder)")
    stub = types.ModuleType("mm_modules.DCN.modules.deform_conv2d")
    stub.DeformConv2dPack = dcn  # type: ignore[attr-defined]
    for name in ("mm_modules", "mm_modules.DCN", "mm_modules.DCN.modules"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules[stub.__name__] = stub
    sys.path.insert(0, str(folder))
    try:
        model_cls: type[nn.Module] = getattr(importlib.import_module(f"models.{module}"), cls)
    finally:
        sys.path.remove(str(folder))
        for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
            del sys.modules[name]  # the other checkout also has a package named "models"
    return model_cls


def _bias(conv: nn.Conv2d) -> Tensor:
    """``conv.bias``, which the DTM offset convs always have."""
    if conv.bias is None:
        raise ValueError("expected a conv with a bias")
    return conv.bias


def build_pair(args: argparse.Namespace, name: str) -> tuple[nn.Module, nn.Module]:
    """(official, ev) models with identical random weights, eval mode."""
    torch.manual_seed(0)
    ev = timm.create_model(name, drop_path_rate=0.0).eval()
    with torch.no_grad():  # trained DTMs have non-zero offsets: exercise the sampling
        for m in ev.modules():
            if isinstance(m, DeformableTokenMerging):
                nn.init.normal_(m.dconv.conv_offset.weight, 0, 0.02)
                nn.init.normal_(_bias(m.dconv.conv_offset), 0, 0.5)
    if name == "litv2_s":
        cls = load_official(Path(args.litv2), "litv2", "LITv2")
        official = cls(depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], alpha=0.9,
                       local_ws=[0, 0, 2, 1], drop_path_rate=0.0)  # fmt: skip
    else:
        cls = load_official(Path(args.lit), "lit", "LIT", TorchvisionDeformConv2dPackLIT)
        official = cls(depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], drop_path_rate=0.0)
    official.load_state_dict(ev.state_dict(), strict=True)
    return official.eval(), ev


# ----------------------------------------------------------------------------- timing
def paired(
    fns: dict[str, Callable[[], Any]], baseline: str, repeats: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Interleaved timing: per repeat every fn once (rotating order); ratio vs ``baseline``."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    out = {}
    for n in names:
        ratios = [b / t for b, t in zip(times[baseline], times[n], strict=True)]
        q = statistics.quantiles(times[n], n=4) if len(times[n]) > 1 else [times[n][0]] * 3
        out[n] = {
            "median_ms": 1e3 * statistics.median(times[n]),
            "iqr_ms": 1e3 * (q[2] - q[0]),
            "speedup_vs_baseline": statistics.median(ratios),
            "n": len(times[n]),
        }
    return out


@contextlib.contextmanager
def autocast(dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
    else:
        with torch.autocast("cpu", dtype=dtype):
            yield


def infer(model: Callable[[Tensor], Tensor], x: Tensor, dtype: torch.dtype | None = None) -> Any:
    def run() -> Tensor:
        with torch.no_grad(), autocast(dtype):
            return model(x)

    return run


def compiled_litv2(
    ev: nn.Module, batch: int, size: int, dtype: torch.dtype | None
) -> tuple[Callable[..., Tensor], dict]:
    """:func:`ev_core.models.compile_model` (inductor, fullgraph, freezing, dynamic batch) under
    autocast ``dtype`` (``None``: fp32). Batch ``batch`` compiles; then 32, 1 and ``batch``
    again must run without recompiling (dynamo's ``error_on_recompile``); the compiled logits
    are compared with eager ones."""
    import torch._dynamo

    from ev_core.models import compile_model

    compiled = compile_model(ev, "inference")
    x = torch.randn(batch, 3, size, size)
    t0 = time.perf_counter()
    with autocast(dtype):
        out = compiled(x)
    info: dict[str, Any] = {"compile_s": time.perf_counter() - t0, "recompiles": {}}
    with torch.no_grad(), autocast(dtype):
        ref = ev(x)
    info["max_abs_diff_vs_eager"] = (out.float() - ref.float()).abs().max().item()
    for b in (32, 1, batch):  # 1: the size a 0/1-specialising guard would split off
        try:
            with torch._dynamo.config.patch(error_on_recompile=True), autocast(dtype):
                compiled(torch.randn(b, 3, size, size))
            info["recompiles"][b] = ""
        except Exception as exc:  # recorded in the results
            info["recompiles"][b] = str(exc).splitlines()[0][:300]
            with autocast(dtype):
                compiled(torch.randn(b, 3, size, size))  # let it recompile; later calls are fine
    return compiled, info


def compile_rows(args: argparse.Namespace, ev: nn.Module, x: Tensor) -> dict[str, Any]:
    """Compiled fp32 and bf16-autocast LITv2-S against ev's eager fp32 and bf16, paired."""
    import torch._dynamo

    torch._dynamo.reset()
    out: dict[str, Any] = {}
    fns: dict[str, Callable[[], Any]] = {"ev fp32 eager": infer(ev, x)}
    comp32, out["fp32"] = compiled_litv2(ev, args.batch, args.size, None)
    print(f"compile fp32: {out['fp32']}", flush=True)
    fns["ev fp32 compiled"] = infer(comp32, x)
    fns["ev bf16 autocast eager"] = infer(ev, x, torch.bfloat16)
    if "bf16-compile" not in args.skip:
        comp16, out["bf16"] = compiled_litv2(ev, args.batch, args.size, torch.bfloat16)
        print(f"compile bf16: {out['bf16']}", flush=True)
        fns["ev bf16 autocast compiled"] = infer(comp16, x, torch.bfloat16)
    rows = paired(fns, "ev fp32 eager", args.repeats, args.warmup)
    if "ev bf16 autocast compiled" in rows:
        t32 = [
            rows["ev fp32 compiled"]["median_ms"],
            rows["ev bf16 autocast compiled"]["median_ms"],
        ]
        out["bf16_compiled_vs_fp32_compiled"] = t32[0] / t32[1]
    out["rows"] = rows
    return out


def profile_table(fn: Callable[[], Any], rows: int = 20) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return str(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


# ----------------------------------------------------------------------------- DTM
def dtm_rows(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    B, H, C = args.batch, 56, 96
    dtm = DeformableTokenMerging(C, 2 * C).eval()
    conv = dtm.dconv
    with torch.no_grad():
        nn.init.normal_(conv.conv_offset.weight, 0, 0.02)
        nn.init.normal_(_bias(conv.conv_offset), 0, 0.5)
    x = torch.randn(B, H, H, C)
    with torch.no_grad():
        offset = conv.conv_offset(x.permute(0, 3, 1, 2))
    xb, ob = x.bfloat16(), offset.bfloat16()
    convb = DeformableTokenMerging(C, 2 * C).dconv
    convb.load_state_dict(conv.state_dict())
    convb.bfloat16()

    def run(c: DeformConv2x2, path: str, xx: Tensor, oo: Tensor, amp: bool = False) -> Any:
        def f() -> Tensor:
            with torch.no_grad(), autocast(torch.bfloat16 if amp else None):
                return c.run_path(path, xx, oo)

        return f

    ref = run(conv, "torchvision", x, offset)()
    err32 = (run(conv, "fast", x, offset)() - ref).abs().max().item()
    err16 = (run(convb, "fast", xb, ob)().float() - ref).abs().max().item()
    fp32 = paired(
        {"torchvision fp32": run(conv, "torchvision", x, offset),
         "ev fast fp32": run(conv, "fast", x, offset)},
        "torchvision fp32", args.repeats * 2, 2,
    )  # fmt: skip
    bf16 = paired(
        {"torchvision bf16 autocast (runs fp32)": run(conv, "torchvision", x, offset, amp=True),
         "ev fast bf16": run(convb, "fast", xb, ob)},
        "torchvision bf16 autocast (runs fp32)", args.repeats * 2, 2,
    )  # fmt: skip
    DTM_PATH_CACHE.clear()
    with torch.no_grad():
        dtm(x.reshape(B, H * H, C), (H, H))
        with autocast(torch.bfloat16):
            dtm(x.reshape(B, H * H, C), (H, H))
    auto = {f"{k[0]} {k[1]} {k[2]}->{k[3]}": v for k, v in DTM_PATH_CACHE.items()}
    return {"fp32": fp32, "bf16": bf16, "max_abs_err_fp32": err32,
            "max_abs_err_bf16_vs_fp32": err16, "auto_choice": auto}  # fmt: skip


# ----------------------------------------------------------------------------- training step
def train_child(args: argparse.Namespace) -> None:
    """One process: a bf16-autocast training step of one LITv2-S; prints a JSON line."""
    torch.set_num_threads(args.threads)
    official, ev = build_pair(args, "litv2_s")
    model = (official if args.train_child == "official" else ev).train()
    del official, ev
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    saved = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    def step(count: bool = False) -> None:
        hooks = (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
            if count
            else contextlib.nullcontext()
        )
        with torch.autocast("cpu", dtype=torch.bfloat16), hooks:
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(count=True)
    times = []
    for _ in range(args.train_steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"step_ms": 1e3 * statistics.median(times), "peak_rss_mib": rss / 2**20,
                      "saved_mib": saved / 2**20}))  # fmt: skip


def train_rows(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for who in ("official", "ev"):
        cmd = [sys.executable, __file__, "--litv2", args.litv2, "--lit", args.lit, "--threads",
               str(args.threads), "--batch", str(args.batch), "--size", str(args.size),
               "--train-steps", str(args.train_steps), "--train-child", who]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        out[who] = json.loads(lines[-1]) if lines else {"error": res.stderr[-2000:]}
    if "step_ms" in out["official"] and "step_ms" in out["ev"]:
        out["ev_speedup"] = out["official"]["step_ms"] / out["ev"]["step_ms"]
        out["ev_rss_ratio"] = out["ev"]["peak_rss_mib"] / out["official"]["peak_rss_mib"]
        out["ev_saved_ratio"] = out["ev"]["saved_mib"] / out["official"]["saved_mib"]
    return out


# ----------------------------------------------------------------------------- main
def fmt_group(title: str, rows: dict[str, dict[str, float]]) -> str:
    lines = [f"\n{title}", "| row | median ms (IQR) | speed-up vs baseline |", "|---|---|---|"]
    for n, r in rows.items():
        lines.append(f"| {n} | {r['median_ms']:.1f} ({r['iqr_ms']:.1f}) | "
                     f"{r['speedup_vs_baseline']:.2f}x |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--litv2", required=True, help="ziplab/LITv2 checkout's classification folder")
    p.add_argument("--lit", required=True, help="ziplab/LIT's classification/code_for_lit_s_m_b")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--skip", nargs="*", default=[], choices=["compile", "bf16-compile", "lit", "dtm"]
    )
    p.add_argument("--profile", action="store_true", help="torch.profiler tables of LITv2-S")
    p.add_argument("--train", action="store_true", help="training step in fresh processes")
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--train-child", choices=["official", "ev"], help=argparse.SUPPRESS)
    p.add_argument("--out", default="benchmark-results/official_cpu.json")
    args = p.parse_args()
    if args.train_child:
        train_child(args)
        return
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"metadata": environment_info(), "args": vars(args)}
    results["metadata"]["load_average"] = list(os.getloadavg())

    official, ev = build_pair(args, "litv2_s")
    x = torch.randn(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        eq = (official(x[:2]) - ev(x[:2])).abs().max().item()
    results["litv2_s_max_abs_diff"] = eq
    print(f"LITv2-S official vs ev, max |diff| of logits: {eq:.2e}", flush=True)
    bf16 = infer(ev, x, torch.bfloat16)

    def bf16_uncached() -> Any:  # every weight cast again, as autocast itself does
        clear_weight_cache()
        return bf16()

    fns: dict[str, Callable[[], Any]] = {
        "official fp32 eager": infer(official, x),
        "ev fp32 eager": infer(ev, x),
        "ev bf16 autocast": bf16,
        "ev bf16 autocast, weight casts not cached": bf16_uncached,
    }
    rows = paired(fns, "official fp32 eager", args.repeats, args.warmup)
    base = rows["ev fp32 eager"]["median_ms"]
    for r in rows.values():
        r["speedup_vs_ev_fp32"] = base / r["median_ms"]
    results["litv2_s"] = rows
    print(fmt_group(f"LITv2-S, batch {args.batch}, {args.threads} threads", rows), flush=True)
    print(f"ev bf16 / ev fp32: {rows['ev bf16 autocast']['speedup_vs_ev_fp32']:.2f}x", flush=True)
    if args.profile:
        results["profile_official"] = profile_table(infer(official, x))
        results["profile_ev"] = profile_table(infer(ev, x))
        print("\nofficial LITv2-S\n" + results["profile_official"])
        print("\nev LITv2-S\n" + results["profile_ev"], flush=True)
    del official, fns
    write_json(Path(args.out), results)

    if "lit" not in args.skip:
        official_lit, ev_lit = build_pair(args, "lit_s")
        with torch.no_grad():
            results["lit_s_max_abs_diff"] = (official_lit(x[:2]) - ev_lit(x[:2])).abs().max().item()
        lit_fns = {"official fp32 eager": infer(official_lit, x), "ev fp32 eager": infer(ev_lit, x)}
        results["lit_s"] = paired(lit_fns, "official fp32 eager", args.repeats, args.warmup)
        print(f"LIT-S max |diff|: {results['lit_s_max_abs_diff']:.2e}")
        print(fmt_group("LIT-S", results["lit_s"]), flush=True)
        del official_lit, ev_lit, lit_fns
    if "dtm" not in args.skip:
        results["dtm"] = dtm_rows(args)
        print(fmt_group("DTM 96->192, 56x56 fp32", results["dtm"]["fp32"]))
        print(fmt_group("DTM bf16", results["dtm"]["bf16"]))
        print("auto path:", results["dtm"]["auto_choice"], flush=True)
    write_json(Path(args.out), results)
    if "compile" not in args.skip:
        results["litv2_s_compile"] = compile_rows(args, ev, x)
        print(fmt_group("LITv2-S compiled (inductor, freezing) vs ev fp32 eager",
                        results["litv2_s_compile"]["rows"]), flush=True)  # fmt: skip
        ratio = results["litv2_s_compile"].get("bf16_compiled_vs_fp32_compiled")
        if ratio is not None:
            print(f"ev bf16 compiled / ev fp32 compiled: {ratio:.2f}x", flush=True)
        write_json(Path(args.out), results)
    if args.train:
        results["train"] = train_rows(args)
        print("training step:", json.dumps(results["train"], indent=1), flush=True)
    results["metadata"]["load_average_end"] = list(os.getloadavg())
    if not math.isfinite(results["litv2_s_max_abs_diff"]):
        sys.exit("error: non-finite outputs")
    print(f"wrote {write_json(Path(args.out), results)}")


if __name__ == "__main__":
    main()
