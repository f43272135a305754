"""Where the LaCT op's device time goes (issue 18): a `jax.profiler` trace per variant, parsed
into time per kernel class, next to the compute floor and the bf16 matmul peak of the same run.

Shape (issue 18): B=4, T=32768, 4 fast-weight heads x 384 (D = Dh), chunk 2048, momentum and
weight norm, bf16 q/k/v, fp32 rates, weights and state, custom backward. Variants (op keyword
arguments, `VARIANTS`): `today` (the defaults), `bf16_bwd` (`backward_dtype="bfloat16"`), and
the same two with Muon (default `muon_dtype`, fp32 update direction). Per variant and mode
(`fwd`: the op; `fwdbwd`: `jax.grad` w.r.t. all ten inputs, as `bench_lact.py` times it):

- the optimized HLO (`compiled.as_text()`) under `--out/hlo/`, and a summary of its dots:
  operand dtypes -> result dtype and precision / algorithm, counted per HLO instruction;
- the median time of `--iters` synced calls, XLA's planned temporaries;
- a trace of `--trace-iters` calls (`--out/trace/<variant>_<mode>/`), parsed here: device-side
  events (the GPU's kernel lines) summed per kernel class (`classify`): `gemm`, `elementwise`,
  `reduction`, `copy/transpose`, `slice/scatter`, `memcpy/memset`, `other`; GEMM TFLOP/s from
  the FLOPs of the HLO instruction each kernel belongs to where the trace names it. CPU traces
  have host events only: the classes are then empty and the table says so.

Then the floor: useful FLOPs (bench_lact's count: 18 D Dh per token and head forward,
fwd+bwd = 3x, plus Newton-Schulz) and executed GEMM FLOPs, in ms at the measured bf16 peak
(a `--matmul-n`^3 bf16 GEMM with fp32 accumulation, timed first). And a Newton-Schulz
micro-benchmark (`--ns`): one 5-step iteration on the `[B, H, 3, 384, 384]` stack of a chunk's
updates at fp32 HIGHEST, the bf16x3 / bf16x6 dot algorithms and bf16 operands, time and error
against HIGHEST (the candidates for a fast and accurate Muon).

    PYTHONPATH=. python benchmarks/profile_lact.py --out $OUT/profile_lact         # GPU, < 3 min
    PYTHONPATH=. python benchmarks/profile_lact.py --smoke --out /tmp/profile_lact # CPU

`--budget-s` stops starting new variants once that many seconds have passed (the table and
JSON are written either way). Writes `profile_lact.json` and `profile_lact.log` under `--out`,
the table last. Needs only jax, flax and numpy.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import shlex
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, time_jitted  # noqa: E402

FULL = dict(batch=4, seq=32768, heads=4, d=384, dh=384, chunk=2048, matmul_n=8192)
SMOKE = dict(batch=1, seq=64, heads=2, d=32, dh=32, chunk=16, matmul_n=256)
VARIANTS = {
    "today": {},
    "bf16_bwd": dict(backward_dtype="bfloat16"),
    "muon": dict(use_muon=True),
    "muon_bf16_bwd": dict(use_muon=True, backward_dtype="bfloat16"),
    "muon_all_bf16": dict(use_muon=True, muon_dtype="bfloat16", backward_dtype="bfloat16"),
}
DEFAULT_VARIANTS = ["today", "bf16_bwd", "muon", "muon_bf16_bwd"]
CLASSES = (
    "gemm",
    "elementwise",
    "reduction",
    "copy/transpose",
    "slice/scatter",
    "memcpy/memset",
    "other",
)
NS_STEPS = 5

# --- the optimized HLO ----------------------------------------------------------------------

_SHAPE = re.compile(
    r"\b(pred|s8|s16|s32|s64|u8|u16|u32|u64|f8e\w+|bf16|f16|f32|f64|c64)\[([0-9,]*)\]"
)
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _SHAPE.findall(text)]


def parse_hlo(text: str) -> dict:
    """`{"instrs": {name: info}, "computations": {name: [instr names]}}` of an HLO module's text.

    `info`: `opcode`, `dtype` / `dims` of the (first) result, `operands` (names), `comp` (the
    computation it is in), `calls` (called computations), `attrs` (the text after the operand
    list), and for dots and GEMM custom calls `flops` (2 x result size x contracted size) and
    `dot` (operand dtypes -> result dtype and the precision / algorithm).
    """
    instrs, comps, comp = {}, defaultdict(list), None
    for line in text.splitlines():
        if line.rstrip() == "}":
            comp = None
            continue
        m = _INSTR.match(line)
        if m and comp is not None:
            name, rtype, opcode, rest = m.groups()
            depth, cut = 1, len(rest)
            for i, ch in enumerate(rest):
                depth += (ch == "(") - (ch == ")")
                if depth == 0:
                    cut = i
                    break
            inside = rest[:cut]
            if "%" in inside:
                operands = re.findall(r"%([\w.\-]+)", inside)
            else:  # names printed without `%`: the last token of each comma-separated operand
                operands = [o.split()[-1] for o in inside.split(",") if o.strip()]
            result = _shapes(rtype)
            info = dict(
                opcode=opcode,
                dtype=result[0][0] if result else None,
                dims=result[0][1] if result else (),
                operands=operands,
                comp=comp,
                attrs=rest[cut + 1 :],
                calls=re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", rest[cut:]),
            )
            instrs[name] = info
            comps[comp].append(name)
            continue
        h = _HEADER.match(line)
        if h and "=" not in line.split("(")[0]:
            comp = h.group(1)
    for info in instrs.values():
        _dot_facts(info, instrs)
    return dict(instrs=instrs, computations=dict(comps))


def _dot_facts(info: dict, instrs: dict) -> None:
    attrs = info["attrs"]
    gemm_call = info["opcode"] == "custom-call" and re.search(
        r'custom_call_target="[^"]*(gemm|matmul)', attrs, re.I
    )
    if info["opcode"] != "dot" and not gemm_call:
        return
    ops = [instrs.get(o) for o in info["operands"][:2]]
    if info["opcode"] == "dot":
        contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", attrs)
        axes = contracting.group(1) if contracting else ""
        prec = re.search(r"operand_precision=\{([^}]*)\}", attrs)
        alg = re.search(r"algorithm=(\w+)", attrs)
    else:
        contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', attrs)
        axes = contracting.group(1).replace('"', "") if contracting else ""
        prec = re.search(r'"operand_precision":\[([^\]]*)\]', attrs)
        alg = re.search(r'"algorithm":"?(\w+)', attrs)
    lhs = ops[0]["dims"] if ops and ops[0] else ()
    k = 1
    for a in (int(x) for x in axes.split(",") if x.strip()):
        k *= lhs[a] if a < len(lhs) else 1
    size = 1
    for x in info["dims"]:
        size *= x
    info["flops"] = 2.0 * size * k if lhs else None
    dtypes = " x ".join(o["dtype"] if o else "?" for o in ops)
    precision = (prec.group(1).replace('"', "") if prec else "").split(",")[0] or "DEFAULT"
    info["dot"] = f"{dtypes} -> {info['dtype']} {precision}" + (f" {alg.group(1)}" if alg else "")


def hlo_dot_summary(hlo: dict) -> dict[str, int]:
    """How many dot / GEMM instructions of each `dot` kind (operand dtypes, precision)."""
    return dict(Counter(i["dot"] for i in hlo["instrs"].values() if "dot" in i))


def _called_dots(info: dict, hlo: dict) -> list[dict]:
    out, seen, todo = [], set(), list(info["calls"])
    while todo:
        comp = todo.pop()
        if comp in seen:
            continue
        seen.add(comp)
        for name in hlo["computations"].get(comp, []):
            sub = hlo["instrs"][name]
            if "dot" in sub:
                out.append(sub)
            todo.extend(sub["calls"])
    return out


def instr_class(info: dict, hlo: dict) -> tuple[str, float | None]:
    """`(kernel class, FLOPs or None)` of one HLO instruction that a kernel runs."""
    op, attrs = info["opcode"], info["attrs"]
    if "dot" in info:
        return "gemm", info.get("flops")
    if op == "fusion":
        dots = _called_dots(info, hlo)
        if dots or "__triton_gemm" in attrs or "kCustom" in attrs and "gemm" in attrs:
            flops = sum(d.get("flops") or 0.0 for d in dots) or None
            return "gemm", flops
        roots = [
            hlo["instrs"][n]["opcode"]
            for c in info["calls"]
            for n in hlo["computations"].get(c, [])
        ]
        if "kind=kInput" in attrs or "reduce" in roots:
            return "reduction", None
        last = roots[-1] if roots else ""
        if last in ("transpose", "copy", "bitcast"):
            return "copy/transpose", None
        if last in ("dynamic-update-slice", "scatter", "gather", "dynamic-slice", "slice"):
            return "slice/scatter", None
        return "elementwise", None
    if op in ("copy", "transpose", "copy-start", "copy-done"):
        return "copy/transpose", None
    if op in ("dynamic-update-slice", "scatter", "gather", "dynamic-slice", "slice", "concatenate"):
        return "slice/scatter", None
    if op in ("reduce", "reduce-window"):
        return "reduction", None
    return "other", None


_GEMM_NAME = re.compile(r"gemm|xmma|cutlass|nvjet|wgmma|cublas|matmul|triton_gemm|sm\d\d_", re.I)


def name_class(name: str) -> str:
    """The kernel class from a kernel name alone (when the trace names no HLO instruction)."""
    n = name.lower()
    if _GEMM_NAME.search(n):
        return "gemm"
    if "memcpy" in n or "memset" in n:
        return "memcpy/memset"
    if "transpose" in n or "copy" in n:
        return "copy/transpose"
    if "reduce" in n or "reduction" in n:
        return "reduction"
    if any(s in n for s in ("dynamic_update_slice", "dynamic-update-slice", "scatter", "gather")):
        return "slice/scatter"
    if "fusion" in n or "loop_" in n or "elementwise" in n:
        return "elementwise"
    return "other"


# --- the trace ------------------------------------------------------------------------------


def load_trace(trace_dir: str) -> dict:
    """The newest `plugins/profile/*/*trace.json.gz` under `trace_dir` (Chrome-trace JSON)."""
    files = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"no *trace.json.gz under {trace_dir}/plugins/profile/")
    # The profiler's own `<host>.trace.json.gz` first; `perfetto_trace.json.gz` (written with
    # `create_perfetto_trace=True`) holds the same events in the same JSON layout.
    newest = max(
        files, key=lambda f: (not os.path.basename(f).startswith("perfetto"), os.path.getmtime(f))
    )
    with gzip.open(newest) as f:
        return json.load(f)


def kernel_events(trace: dict) -> tuple[list[dict], str]:
    """Device-side duration events at kernel granularity, and which lines they came from.

    A GPU trace has a process per device (`/device:GPU:0`) with lines per CUDA stream (the
    kernels) and summary lines (`XLA Modules`, `XLA Ops`, `Steps`) that repeat the same time;
    the stream lines are taken if present, else `XLA Ops`, else every non-summary line. Host
    processes (`/host:CPU`) are never device time: a CPU trace gives no events.
    """
    events = trace.get("traceEvents", [])
    pname, tname = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            pname[e["pid"]] = str(e.get("args", {}).get("name", ""))
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            tname[(e["pid"], e.get("tid"))] = str(e.get("args", {}).get("name", ""))
    device = {p for p, n in pname.items() if "/device:" in n or "gpu" in n.lower()}
    device -= {p for p, n in pname.items() if "/host:" in n}
    by_line = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device and "dur" in e:
            by_line[tname.get((e["pid"], e.get("tid")), "")].append(e)
    summary = ("xla modules", "steps", "xla ops", "tensorflow ops", "framework")
    streams = [ln for ln in by_line if "stream" in ln.lower()]
    ops = [ln for ln in by_line if ln.lower().startswith("xla ops")]
    lines = streams or ops or [ln for ln in by_line if not ln.lower().startswith(summary)]
    picked = "streams" if streams else "xla ops" if ops else "all device lines"
    return [e for ln in lines for e in by_line[ln]], picked if lines else "none"


def _hlo_name(event: dict, hlo: dict) -> str | None:
    args = event.get("args", {}) or {}
    for key in ("hlo_op", "long_name", "tf_op", "name"):
        value = str(args.get(key, ""))
        for token in re.findall(r"[\w.\-]+", value):
            if token in hlo["instrs"]:
                return token
    name = event.get("name", "")
    if name in hlo["instrs"]:
        return name
    dotted = re.sub(r"_(\d+)$", r".\1", name)
    return dotted if dotted in hlo["instrs"] else None


def summarise(events: list[dict], hlo: dict, calls: int) -> dict:
    """Per-call time (ms) per class, GEMM FLOPs where the trace names their instructions, the
    device-busy span, and the 12 kernels that take longest."""
    ms = dict.fromkeys(CLASSES, 0.0)
    gemm_flops, gemm_named_ms, named, per_kernel = 0.0, 0.0, 0, Counter()
    for e in events:
        dur = float(e["dur"]) / 1e3 / calls  # trace durations are in microseconds
        instr = _hlo_name(e, hlo)
        if instr is not None:
            named += 1
            cls, flops = instr_class(hlo["instrs"][instr], hlo)
            if cls == "gemm" and flops:
                gemm_flops += flops / calls
                gemm_named_ms += dur
        else:
            cls = name_class(e.get("name", ""))
        ms[cls] += dur
        per_kernel[(cls, e.get("name", "")[:90])] += dur
    span = 0.0
    if events:
        start = min(float(e["ts"]) for e in events)
        end = max(float(e["ts"]) + float(e["dur"]) for e in events)
        span = (end - start) / 1e3 / calls
    return dict(
        events=len(events),
        named_events=named,
        class_ms=ms,
        busy_ms=sum(ms.values()),
        span_ms=span,
        gemm_flops_named=gemm_flops,
        gemm_tflops_named=gemm_flops / (gemm_named_ms * 1e-3) / 1e12 if gemm_named_ms else None,
        top=[dict(cls=c, kernel=k, ms=v) for (c, k), v in per_kernel.most_common(12)],
    )


# --- the op -----------------------------------------------------------------------------------


def make_inputs(shape: dict):
    """bench_lact's inputs (bf16 q, k, v near unit norm, softplus rates, sigmoid momentum,
    w0 = w2 near 0.5 I, w1 small), so times compare with its table."""
    from bench_lact import make_inputs as bench_inputs

    return bench_inputs(shape)


def useful_flops(shape: dict, muon: bool) -> float:
    """bench_lact's forward count x 3 (fwd+bwd), Newton-Schulz included under Muon."""
    from bench_lact import forward_flops

    s = shape
    return 3 * forward_flops(s["batch"], s["seq"], s["heads"], s["d"], s["dh"], s["chunk"], muon)


def executed_gemm_flops(shape: dict, mode: str, muon: bool) -> float:
    """GEMM FLOPs the XLA path executes (RESULTS.md, "LaCT performance"): per chunk, in units
    U of one `[C, D] x [D, Dh]` GEMM over every (b, h), 9 U forward (read 3, update 6) and 32 U
    under `jax.grad` (update 6, recompute 8, transposes 18); Newton-Schulz 1x / 4x."""
    s = shape
    n = s["seq"] // s["chunk"]
    unit = 2.0 * s["chunk"] * s["d"] * s["dh"] * s["batch"] * s["heads"]
    flops = n * unit * (9 if mode == "fwd" else 32)
    if muon:
        r, q = min(s["d"], s["dh"]), max(s["d"], s["dh"])
        ns = s["batch"] * s["heads"] * n * 3 * NS_STEPS * (4 * r * r * q + 2 * r**3)
        flops += ns * (1 if mode == "fwd" else 4)
    return flops


def build(shape: dict, variant: str, mode: str):
    import jax
    import jax.numpy as jnp

    from ttt_jax.ops import lact_swiglu

    knobs = dict(chunk_size=shape["chunk"], **VARIANTS[variant])

    def forward(q, k, v, lr0, lr1, lr2, beta, w0, w1, w2):
        return lact_swiglu(q, k, v, lr0, lr1, lr2, momentum=beta, w0=w0, w1=w1, w2=w2, **knobs)

    if mode == "fwd":
        return jax.jit(forward)

    def loss(*args):
        return jnp.sum(forward(*args)[0].astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=tuple(range(10))))


def profile_one(shape, variant, mode, args, out: Path, iters: int, trace_iters: int) -> dict:
    import jax

    fn = build(shape, variant, mode)
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    row = dict(variant=variant, mode=mode, compile_s=time.perf_counter() - t0)
    text = compiled.as_text()
    (out / "hlo").mkdir(parents=True, exist_ok=True)
    (out / "hlo" / f"{variant}_{mode}.hlo.txt").write_text(text)
    hlo = parse_hlo(text)
    row["dots"] = hlo_dot_summary(hlo)
    row["temp_gb"] = compiled.memory_analysis().temp_size_in_bytes / 1e9
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    row["xla_flops_static"] = float((cost or {}).get("flops", 0.0))
    row.update(time_jitted(fn, *args, iters=iters))
    trace_dir = out / "trace" / f"{variant}_{mode}"
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for _ in range(trace_iters):
            jax.block_until_ready(fn(*args))
    try:
        events, lines = kernel_events(load_trace(str(trace_dir)))
    except (OSError, ValueError) as e:  # keep the timings; the xplane.pb stays for a re-parse
        row["trace_error"] = f"{type(e).__name__}: {e}"[:300]
    else:
        for pb in glob.glob(str(trace_dir / "plugins" / "profile" / "*" / "*.xplane.pb")):
            os.remove(pb)  # the JSON trace is kept; the protobuf only repeats it, larger
        row["trace"] = dict(summarise(events, hlo, trace_iters), lines=lines)
    muon = VARIANTS[variant].get("use_muon", False)
    row["useful_tflop"] = (
        useful_flops(shape, muon) / 3 if mode == "fwd" else useful_flops(shape, muon)
    ) / 1e12
    row["executed_gemm_tflop"] = executed_gemm_flops(shape, mode, muon) / 1e12
    return row


def matmul_peak(n: int) -> dict:
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    fn = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    t = time_jitted(fn, a, b, warmup=3, iters=10)
    return dict(n=n, **t, tflops=2 * n**3 / (t["min_ms"] * 1e-3) / 1e12)


def ns_algorithms(shape: dict) -> list[dict]:
    """One Newton-Schulz iteration (SPEC 3.2 coefficients) on a `[B, H, 3, r, r]` fp32 stack,
    its matmuls at each precision; time and error against fp32 HIGHEST."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from ttt_jax.ops.lact.math import NS_COEFFS

    r = min(shape["d"], shape["dh"])
    g = jax.random.normal(jax.random.PRNGKey(3), (shape["batch"], shape["heads"], 3, r, r))
    f32, bf16 = jnp.float32, jnp.bfloat16
    presets = lax.DotAlgorithmPreset
    kinds = {
        "fp32 HIGHEST": (f32, lax.Precision.HIGHEST),
        "bf16x6 (BF16_BF16_F32_X6)": (f32, getattr(presets, "BF16_BF16_F32_X6", None)),
        "bf16x3 (BF16_BF16_F32_X3)": (f32, getattr(presets, "BF16_BF16_F32_X3", None)),
        "tf32 (DEFAULT fp32)": (f32, None),
        "bf16 operands": (bf16, None),
    }

    def ns(x, dtype, precision):
        def mm(spec, a, b):
            return jnp.einsum(
                spec,
                a.astype(dtype),
                b.astype(dtype),
                precision=precision,
                preferred_element_type=f32,
            )

        x = x / (jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True)) + 1e-7)
        for a, b, c in NS_COEFFS:
            gram = mm("...ij,...kj->...ik", x, x)
            x = a * x + mm(
                "...ij,...jk->...ik", b * gram + c * mm("...ij,...jk->...ik", gram, gram), x
            )
        return x

    rows, ref = [], None
    for name, (dtype, precision) in kinds.items():
        if precision is None and "DEFAULT" not in name and dtype == f32:
            rows.append(dict(kind=name, error="preset missing in this jax"))
            continue
        try:
            fn = jax.jit(lambda x, d=dtype, p=precision: ns(x, d, p))
            out = fn(g)
            t = time_jitted(fn, g, iters=10)
            ref = out if ref is None else ref
            err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
            rows.append(dict(kind=name, **t, rel_err_vs_highest=err))
        except Exception as e:  # an algorithm the backend does not take
            rows.append(dict(kind=name, error=f"{type(e).__name__}: {str(e)[:160]}"))
    return rows


# --- the table --------------------------------------------------------------------------------


def table(rows: list[dict], peak: float | None) -> str:
    head = (
        "| variant | mode | ms | useful TFLOP/s | % peak | floor ms | GEMM ms (TFLOP/s) | "
        + " | ".join(c for c in CLASSES if c != "gemm")
        + " | busy / span ms | temp GB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('variant')} | {r.get('mode')} | error: {r['error'][:120]} |")
            continue
        ms = r["median_ms"]
        tr = r.get("trace") or dict(class_ms=dict.fromkeys(CLASSES, 0.0), busy_ms=0.0, span_ms=0.0)
        useful = r["useful_tflop"] / (ms * 1e-3)
        floor = r["executed_gemm_tflop"] * 1e12 / (peak * 1e12) * 1e3 if peak else float("nan")
        cm = tr["class_ms"]
        gemm_rate = r["executed_gemm_tflop"] / (cm["gemm"] * 1e-3) if cm["gemm"] else None
        gemm = f"{cm['gemm']:.2f}" + (f" ({gemm_rate:.0f})" if gemm_rate else "")
        rest = " | ".join(f"{cm[c]:.2f}" for c in CLASSES if c != "gemm")
        pct = f"{100 * useful / peak:.1f}" if peak else "-"
        lines.append(
            f"| {r['variant']} | {r['mode']} | {ms:.2f} | {useful:.1f} | {pct} | {floor:.2f} | "
            f"{gemm} | {rest} | {tr['busy_ms']:.2f} / {tr['span_ms']:.2f} | {r['temp_gb']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "profile_lact"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU check)")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--modes", nargs="+", default=["fwdbwd", "fwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--trace-iters", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=170.0)
    p.add_argument("--no-ns", dest="ns", action="store_false", help="skip the Newton-Schulz part")
    a = p.parse_args()
    t_start = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "profile_lact.log"
    log_path.write_text("")

    def log(line: str) -> None:
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    shape = dict(SMOKE if a.smoke else FULL)
    env = environment()
    log(f"`python {' '.join(shlex.quote(s) for s in sys.argv)}`")
    log(json.dumps(env) + f" XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    peak = matmul_peak(shape["matmul_n"])
    log(f"bf16 matmul peak ({peak['n']}^3): {peak['tflops']:.1f} TFLOP/s")
    args = make_inputs(shape)
    rows, skipped = [], []
    for variant in a.variants:
        if time.perf_counter() - t_start > a.budget_s:
            skipped.append(variant)
            continue
        for mode in a.modes:
            try:
                row = profile_one(shape, variant, mode, args, out, a.iters, a.trace_iters)
            except Exception as e:  # keep the other variants' numbers
                row = dict(variant=variant, mode=mode, error=f"{type(e).__name__}: {e}"[:400])
            rows.append(row)
            log(json.dumps({k: v for k, v in row.items() if k != "trace"}))
            if "trace" in row:
                tr = row["trace"]
                log(
                    f"  trace: {tr['events']} device events ({tr['lines']}), {tr['named_events']} "
                    f"named an HLO instruction; top kernels:"
                )
                for k in tr["top"]:
                    log(f"    {k['ms']:8.3f} ms  {k['cls']:15s} {k['kernel']}")
    ns_rows = (
        ns_algorithms(shape) if a.ns and time.perf_counter() - t_start < a.budget_s + 30 else []
    )
    result = dict(
        environment=env,
        command=sys.argv,
        shape=shape,
        matmul_peak=peak,
        rows=rows,
        newton_schulz=ns_rows,
        skipped_for_budget=skipped,
        wall_s=time.perf_counter() - t_start,
    )
    (out / "profile_lact.json").write_text(json.dumps(result, indent=1, default=str))
    for r in ns_rows:
        log("Newton-Schulz " + json.dumps(r))
    if skipped:
        log(f"skipped for the {a.budget_s:.0f} s budget: {skipped}")
    if not any(r.get("trace", {}).get("events") for r in rows):
        log("no device events in the traces (a CPU run has host events only): classes are 0")
    log(
        f"\n{env}\nshape {shape}; floor = executed GEMM FLOPs at the measured peak; "
        f"wall {result['wall_s']:.0f} s\n"
    )
    log(table(rows, peak["tflops"]))


if __name__ == "__main__":
    main()
