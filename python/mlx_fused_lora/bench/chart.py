"""The PNG chart of a ``mlx-fused-lora bench`` report (matplotlib, the ``bench`` extra).

Top rows, one per dropout p: the fused op's speed-up over each plain-MLX peer per
shape (peer time / fused time, bars), with the limit marked over each bar (peer time /
limit time: the most any LoRA layer could gain over that peer). Bottom row: what
the LoRA path costs, fused time / limit time, for every shape in the report.
"""

PEER_STYLE = {
    "plain": ("mlx-lm LoRALinear", "#4c72b0"),
    "plain_compiled": ("mlx-lm LoRALinear, mx.compile", "#55a868"),
    "plain_addmm": ("plain MLX at its best (addmm)", "#c44e52"),
}
PASS_TITLE = {"forward": "forward", "forward_backward": "forward + backward"}


def _label(row, dtypes):
    text = f"{row['m']}x{row['k']}\nr{row['r']}"
    return text + (f"\n{row['dtype']}" if len(dtypes) > 1 else "")


def write_chart(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["ratios"]
    passes = [p for p in ("forward", "forward_backward") if any(r["pass_name"] == p for r in rows)]
    dropouts = sorted({r["dropout"] for r in rows})
    dtypes = sorted({r["dtype"] for r in rows})
    peer_rows = [r for r in rows if any(f"{peer}_over_fused" in r for peer in PEER_STYLE)]
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
                ax = axes[i][j]
                selected = rows_for(peer_keys, pass_name, p)
                bar_width = 0.8 / len(PEER_STYLE)
                for n, (peer, (legend, color)) in enumerate(PEER_STYLE.items()):
                    for x, row in enumerate(selected):
                        if row is None or f"{peer}_over_fused" not in row:
                            continue
                        left = x - 0.4 + n * bar_width
                        speedup, ceiling = row[f"{peer}_over_fused"], row[f"{peer}_over_limit"]
                        ax.bar(left, speedup, bar_width, align="edge", color=color, label=legend if x == 0 else None)
                        ax.hlines(
                            ceiling,
                            left,
                            left + bar_width,
                            colors="black",
                            linewidth=2,
                            label="limit (peer / limit)" if x == 0 and n == 0 else None,
                        )
                        ax.text(
                            left + bar_width / 2,
                            speedup,
                            f"{speedup:.0f}" if speedup >= 10 else f"{speedup:.1f}",
                            ha="center",
                            va="bottom",
                            fontsize=6,
                        )
                ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
                ax.set_yscale("log")
                ax.set_xticks(range(len(peer_keys)))
                ax.set_xticklabels(
                    [_label(dict(dtype=d, m=m, k=k, r=r), dtypes) for d, m, k, r in peer_keys], fontsize=7
                )
                ax.set_title(f"{PASS_TITLE[pass_name]}, p = {p}: speed-up of fused over each peer", fontsize=9)
                values = [
                    r[f"{peer}_over_{what}"]
                    for r in selected
                    if r
                    for peer in PEER_STYLE
                    for what in ("fused", "limit")
                    if f"{peer}_over_{what}" in r
                ]
                ax.set_ylim(min(values + [1.0]) * 0.8, max(values + [2.0]) * 2)
                ax.set_ylabel("peer time / fused time")
        # One legend for the peer panels, above them, where it hides no bar.
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(
            handles,
            labels,
            loc="upper center",
            ncol=len(labels),
            fontsize=8,
            bbox_to_anchor=(0.5, 1 - 0.45 / fig.get_figheight()),
        )

    for j, pass_name in enumerate(passes):
        ax = axes[-1][j]
        bar_width = 0.8 / len(dropouts)
        for n, p in enumerate(dropouts):
            values = [row["fused_over_limit"] if row else 0 for row in rows_for(shape_keys, pass_name, p)]
            ax.bar(
                [x - 0.4 + n * bar_width for x in range(len(shape_keys))],
                values,
                bar_width,
                align="edge",
                label=f"p = {p}",
                color=["#8172b2", "#ccb974", "#64b5cd"][n % 3],
            )
        ax.axhline(1.0, color="black", linewidth=1.5, label="limit (the GEMMs alone)")
        values = [r["fused_over_limit"] for r in rows if r["pass_name"] == pass_name]
        ax.set_ylim(min(values + [1.0]) * 0.9, max(values + [1.1]) * 1.15)
        ax.set_xticks(range(len(shape_keys)))
        # Every shape is here: one-line labels, slanted, so 27 of them stay readable.
        ax.set_xticklabels(
            [_label(dict(dtype=d, m=m, k=k, r=r), dtypes).replace("\n", " ") for d, m, k, r in shape_keys],
            fontsize=7,
            rotation=60,
            ha="right",
        )
        ax.set_title(f"{PASS_TITLE[pass_name]}: fused / limit, what the LoRA path costs", fontsize=9)
        ax.set_ylabel("fused / limit")
        if j == 0:
            ax.legend(fontsize=7, loc="upper right")

    machine, versions = report["machine"], report["versions"]
    fig.suptitle(
        f"mlx-fused-lora on {machine['device']} ({machine['cpu']}, {machine['cpu_count']} cores), "
        f"mlx {versions['mlx']}; shapes M x K (= N), rank r\n{report['command']}",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)
