"""The PNG chart of a ``mlx-fused-lora bench`` report (matplotlib, the ``bench`` extra).

Top rows, one per dropout p: the fused op's speed-up over each peer per shape (peer
time / fused time, bars), with the limit marked over each bar (peer time / limit
time: the most any LoRA layer could gain over that peer). Bottom row: what the LoRA
path costs, fused time / limit time, for every shape in the report. Every ratio axis
starts at 0; a cell the run cannot trust (fused below the limit, gauge moved) is
hatched and its value printed with a "?".
"""

PEER_STYLE = {
    "plain": ("mlx-lm LoRALinear", "#4c72b0"),
    "plain_compiled": ("mlx-lm LoRALinear, mx.compile", "#55a868"),
    "plain_addmm": ("plain MLX at its best (addmm)", "#c44e52"),
    "peft": ("PyTorch + PEFT LoRA", "#dd8452"),
}
PASS_TITLE = {"forward": "forward", "forward_backward": "forward + backward"}
UNTRUSTED_HATCH = "////"
LIMIT_COLORS = ("#8172b2", "#ccb974", "#64b5cd")


def _label(row, dtypes):
    text = f"{row['m']}x{row['k']}\nr{row['r']}"
    return text + (f"\n{row['dtype']}" if len(dtypes) > 1 else "")


def _limit_ratio(row, peer):
    """peer time / the fused op's limit time."""
    if peer == "peft":
        return row["peft_over_peft_limit"] * row["peft_limit_over_limit"]
    return row[f"{peer}_over_limit"]


def _value_text(value, untrusted):
    text = f"{value:.0f}" if value >= 10 else f"{value:.2f}" if value < 2 else f"{value:.1f}"
    return text + ("?" if untrusted else "")


def _peer_panel(ax, selected, peers, keys, dtypes, title):
    bar_width = 0.8 / len(peers)
    tops = []
    for n, peer in enumerate(peers):
        legend, color = PEER_STYLE[peer]
        for x, row in enumerate(selected):
            if row is None or f"{peer}_over_fused" not in row:
                continue
            untrusted = bool(row.get("untrusted"))
            left = x - 0.4 + n * bar_width
            speedup, ceiling = row[f"{peer}_over_fused"], _limit_ratio(row, peer)
            ax.bar(
                left,
                speedup,
                bar_width,
                align="edge",
                color=color,
                hatch=UNTRUSTED_HATCH if untrusted else None,
                edgecolor="white" if untrusted else color,
            )
            ax.hlines(ceiling, left, left + bar_width, colors="black", linewidth=2)
            top = max(speedup, ceiling)
            tops.append(top)
            # Above the bar and its limit mark, whichever is higher: the text never covers the mark.
            ax.annotate(
                _value_text(speedup, untrusted),
                (left + bar_width / 2, top),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=6,
            )
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    ax.set_ylim(0, max(tops + [2.0]) * 1.18)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([_label(dict(dtype=d, m=m, k=k, r=r), dtypes) for d, m, k, r in keys], fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("peer time / fused time")


def _limit_panel(ax, rows_for, keys, dropouts, dtypes, pass_name, legend):
    bar_width = 0.8 / len(dropouts)
    tops = [1.1]
    for n, p in enumerate(dropouts):
        color = LIMIT_COLORS[n % 3]
        for x, row in enumerate(rows_for(keys, pass_name, p)):
            if row is None:
                continue
            untrusted = bool(row.get("untrusted"))
            left = x - 0.4 + n * bar_width
            ax.bar(
                left,
                row["fused_over_limit"],
                bar_width,
                align="edge",
                color=color,
                hatch=UNTRUSTED_HATCH if untrusted else None,
                edgecolor="white" if untrusted else color,
            )
            if untrusted:
                ax.annotate("?", (left + bar_width / 2, row["fused_over_limit"]), ha="center", va="bottom", fontsize=7)
            tops.append(row["fused_over_limit"])
    ax.axhline(1.0, color="black", linewidth=1.5)
    ax.set_ylim(0, max(tops) * 1.35)  # headroom for the legend above the bars
    ax.set_xticks(range(len(keys)))
    # Every shape is here: one-line labels, slanted, so 27 of them stay readable.
    ax.set_xticklabels(
        [_label(dict(dtype=d, m=m, k=k, r=r), dtypes).replace("\n", " ") for d, m, k, r in keys],
        fontsize=7,
        rotation=60,
        ha="right",
    )
    ax.set_title(f"{PASS_TITLE[pass_name]}: fused / limit, what the LoRA path costs", fontsize=9)
    ax.set_ylabel("fused / limit")
    if legend:
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        handles = [Patch(color=LIMIT_COLORS[n % 3], label=f"p = {p}") for n, p in enumerate(dropouts)]
        handles.append(Line2D([], [], color="black", linewidth=1.5, label="limit (the GEMMs alone)"))
        ax.legend(handles=handles, fontsize=7, loc="upper right", ncol=len(handles), framealpha=0.9)


def write_chart(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = report["ratios"]
    passes = [p for p in ("forward", "forward_backward") if any(r["pass_name"] == p for r in rows)]
    dropouts = sorted({r["dropout"] for r in rows})
    dtypes = sorted({r["dtype"] for r in rows})
    peers = [peer for peer in PEER_STYLE if any(f"{peer}_over_fused" in r for r in rows)]
    peer_rows = [r for r in rows if any(f"{peer}_over_fused" in r for peer in peers)]
    shape_keys = sorted({(r["dtype"], r["m"], r["k"], r["r"]) for r in rows})
    peer_keys = sorted({(r["dtype"], r["m"], r["k"], r["r"]) for r in peer_rows})

    n_rows = len(dropouts) * bool(peer_rows) + 1
    n_cols = max(len(passes), 1)
    width = max(11.0, 0.42 * max(len(shape_keys), 2 * len(peer_keys)) * n_cols + 2)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width, 3.6 * n_rows), squeeze=False)

    def rows_for(keys, pass_name, p):
        index = {
            (r["dtype"], r["m"], r["k"], r["r"]): r for r in rows if r["pass_name"] == pass_name and r["dropout"] == p
        }
        return [index.get(key) for key in keys]

    if peer_rows:
        for i, p in enumerate(dropouts):
            for j, pass_name in enumerate(passes):
                title = f"{PASS_TITLE[pass_name]}, p = {p}: speed-up of fused over each peer"
                _peer_panel(axes[i][j], rows_for(peer_keys, pass_name, p), peers, peer_keys, dtypes, title)
        # One legend for the peer panels, above them, where it hides no bar.
        handles = [Patch(color=PEER_STYLE[peer][1], label=PEER_STYLE[peer][0]) for peer in peers]
        handles.append(Line2D([], [], color="black", linewidth=2, label="limit (peer / limit)"))
        if any(r.get("untrusted") for r in rows):
            handles.append(
                Patch(facecolor="lightgray", hatch=UNTRUSTED_HATCH, edgecolor="white", label="untrusted cell (?)")
            )
        fig.legend(
            handles=handles,
            loc="upper center",
            ncol=len(handles),
            fontsize=8,
            bbox_to_anchor=(0.5, 1 - 0.45 / fig.get_figheight()),
        )

    for j, pass_name in enumerate(passes):
        _limit_panel(axes[-1][j], rows_for, shape_keys, dropouts, dtypes, pass_name, legend=j == 0)

    machine, versions = report["machine"], report["versions"]
    blas = report.get("blas")
    blas_text = f"; MLX matmul on {blas['plain_peers'].split(' (')[0]}" if blas else ""
    fig.suptitle(
        f"mlx-fused-lora on {machine['device']} ({machine['cpu']}, {machine['cpu_count']} cores), "
        f"mlx {versions['mlx']}{blas_text}; shapes M x K (= N), rank r; hatched / ?: untrusted cell\n"
        f"{report['command']}",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)
