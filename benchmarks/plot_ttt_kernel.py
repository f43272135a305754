"""The issue-16 plots from recorded results (no GPU needed): TTT-Linear op time vs T (our XLA
path, our Pallas kernel, fla) at B=8 and B=1, and the 125m / 125m-attn models' tokens/s vs T.

    pip install -e ".[plot]"
    python benchmarks/plot_ttt_kernel.py            # writes benchmarks/results/ttt_kernel_h100.png

Op rows come from `results/ttt_kernel_h100_2026-12-07.json`; XLA rows that its time budget
skipped (T=8192) from the sweep log of the same session (`ttt_kernel_sweep_h100_2026-12-07.log`),
drawn hollow. Model rows from `results/lm_125m_kernel_t{8192,32768}_h100_2026-12-07.json`.
"""

from __future__ import annotations

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
DAY = "2026-12-07"


def op_rows() -> tuple[list[dict], list[dict]]:
    main = json.loads((RESULTS / f"ttt_kernel_h100_{DAY}.json").read_text())
    main = main["rows"] if isinstance(main, dict) else main
    main = [r for r in main if r.get("fwdbwd_ms") and r.get("dim") == 64]
    have = {(r["batch"], r["seq"], r["impl"]) for r in main}
    extra = []
    for line in (RESULTS / f"ttt_kernel_sweep_h100_{DAY}.log").read_text().splitlines():
        if line.startswith("{") and '"impl": "xla"' in line:
            r = json.loads(line)
            if r.get("dim") == 64 and (r["batch"], r["seq"], "xla") not in have:
                extra.append(r)
    return main, extra


def series(rows: list[dict], batch: int, impl: str) -> list[tuple[int, float]]:
    """`(T, fwd+bwd ms)` of one implementation at one batch size, by T."""
    return sorted(
        (r["seq"], r["fwdbwd_ms"]) for r in rows if (r["batch"], r["impl"]) == (batch, impl)
    )


def columns(pts: list[tuple]) -> tuple[list, list]:
    return [p[0] for p in pts], [p[1] for p in pts]


def main() -> None:
    rows, extra = op_rows()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    styles = {"kernel": ("C0", "ours, Pallas kernel"), "fla": ("C1", "fla chunk_ttt_linear"),
              "xla": ("C2", "ours, XLA scan")}  # fmt: skip
    for ax, b in zip(axes[:2], (8, 1), strict=True):
        for impl, (color, label) in styles.items():
            pts = series(rows, b, impl)
            if pts:
                ax.plot(*columns(pts), "o-", color=color, label=label)
            more = series(extra, b, impl)
            if more:
                ax.plot(*columns(more), "o", color=color, mfc="none")
        ax.set(xscale="log", yscale="log", xlabel="T (tokens)", ylabel="fwd+bwd ms",
               title=f"TTT-Linear op, B={b}, 12 x 64, bf16, H100")  # fmt: skip
        ax.set_xticks([8192, 32768], ["8192", "32768"])
        ax.tick_params(axis="x", which="minor", labelbottom=False)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax = axes[2]
    for preset, color in (("125m", "C0"), ("125m-attn", "C3")):
        pts = []
        for t in (8192, 32768):
            d = json.loads((RESULTS / f"lm_125m_kernel_t{t}_h100_{DAY}.json").read_text())
            pts.append((t, d["summary"][preset]["tokens_per_s"] / 1e3))
        ax.plot(*columns(pts), "o-", color=color, label=preset)
    ax.set(xscale="log", xlabel="T (tokens; B=4 at 8192, B=1 at 32768)", ylabel="k tokens/s",
           title="125m training, one H100")  # fmt: skip
    ax.set_xticks([8192, 32768], ["8192", "32768"])
    ax.tick_params(axis="x", which="minor", labelbottom=False)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = RESULTS / "ttt_kernel_h100.png"
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
