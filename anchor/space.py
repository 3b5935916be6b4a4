"""Persona-space report: plots and tables a person reads to judge whether an axis is any good.

It shows the four things that say whether extraction found a real Assistant direction: where the roles and the
default sit on PC1/PC2, how much variance PC1 explains, how well the axis lines up with PC1 at every layer, and
which roles sit at each end of the axis.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from anchor.axis import AssistantAxis

PLOTS = ("persona_space.png", "layers.png", "roles.png")


def summary(axis: AssistantAxis, layer: int | None = None, k: int = 10) -> dict:
    """The report's numbers as plain JSON-able data."""
    layer = axis.report_layer if layer is None else layer
    proj = axis.role_projections(layer)
    order = proj.argsort(descending=True).tolist()
    default = axis.default_projection(layer)
    return {
        "layer": layer,
        "model_id": axis.metadata.get("model_id"),
        "n_roles": len(axis.role_names),
        "n_answers": axis.metadata.get("n_answers"),
        "pc1_cosine": [round(float(c), 4) for c in axis.pc1_cosine()],
        "explained_pc1": [round(float(e), 4) for e in axis.pca.explained[:, 0]],
        "explained": [round(float(e), 4) for e in axis.pca.explained[layer]],
        "default_projection": round(default, 4),
        "default_above_roles": round(float((proj < default).float().mean()), 4),
        "top_roles": [(axis.role_names[i], round(float(proj[i]), 3)) for i in order[:k]],
        "bottom_roles": [(axis.role_names[i], round(float(proj[i]), 3)) for i in order[::-1][:k]],
    }


def plot_scatter(axis: AssistantAxis, layer: int, path: Path) -> None:
    coords = axis.pca.role_coords[:, layer, :2].numpy()
    proj = axis.role_projections(layer).numpy()
    fig, ax = plt.subplots(figsize=(11, 8))
    points = ax.scatter(coords[:, 0], coords[:, 1], c=proj, cmap="coolwarm_r", s=28, edgecolors="none")
    for name, (x, y) in zip(axis.role_names, coords, strict=True):
        ax.annotate(name, (x, y), fontsize=6, alpha=0.75, xytext=(2, 2), textcoords="offset points")
    dx, dy = axis.pca.default_coords[layer, :2].tolist()
    ax.scatter([dx], [dy], marker="*", s=400, c="gold", edgecolors="black", zorder=5, label="default Assistant")
    fig.colorbar(points, ax=ax, label="projection on the Assistant Axis")
    ev = axis.pca.explained[layer]
    ax.set_xlabel(f"PC1 ({ev[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({ev[1]:.0%} of variance)")
    ax.set_title(f"Persona space at layer {layer}: {len(axis.role_names)} roles")
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_layers(axis: AssistantAxis, path: Path) -> None:
    layers = range(axis.n_layers)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    left.plot(layers, axis.pc1_cosine().numpy(), marker="o", ms=3)
    left.axhline(0.6, color="grey", ls="--", lw=1, label="0.6 (paper: > 0.6 at every layer)")
    left.set(xlabel="layer", ylabel="cosine(axis, PC1)", title="Axis vs PC1", ylim=(-0.05, 1.0))
    left.legend(fontsize=8)
    for i in range(min(3, axis.pca.explained.shape[1])):
        right.plot(layers, axis.pca.explained[:, i].numpy(), marker="o", ms=3, label=f"PC{i + 1}")
    right.set(xlabel="layer", ylabel="explained variance ratio", title="Persona-space PCA")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_roles(axis: AssistantAxis, layer: int, path: Path, k: int = 15) -> None:
    proj = axis.role_projections(layer)
    order = proj.argsort().tolist()
    picked = order[:k] + order[-k:] if len(order) > 2 * k else order
    fig, ax = plt.subplots(figsize=(7, 0.22 * len(picked) + 1.2))
    ax.barh([axis.role_names[i] for i in picked], [float(proj[i]) for i in picked], color="steelblue")
    ax.axvline(axis.default_projection(layer), color="goldenrod", lw=2, label="default Assistant")
    ax.set(xlabel="projection on the Assistant Axis", title=f"Roles at each end of the axis (layer {layer})")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _markdown(s: dict) -> str:
    rows = "\n".join(f"| {i} | {c:.3f} | {e:.3f} |" for i, (c, e) in enumerate(zip(s["pc1_cosine"], s["explained_pc1"],
                                                                                      strict=True)))
    top = ", ".join(f"{n} ({p:+.2f})" for n, p in s["top_roles"])
    bottom = ", ".join(f"{n} ({p:+.2f})" for n, p in s["bottom_roles"])
    return f"""# Assistant Axis report: {s['model_id']}

{s['n_roles']} roles, {s['n_answers']} answers. Report layer {s['layer']}.

- cosine(axis, PC1) at layer {s['layer']}: **{s['pc1_cosine'][s['layer']]:.3f}**
- PC1 explains **{s['explained'][0]:.1%}** of persona-space variance at layer {s['layer']}
- default Assistant projection {s['default_projection']:+.2f}, above **{s['default_above_roles']:.0%}** of roles

Most Assistant-like roles: {top}

Least Assistant-like roles: {bottom}

![persona space](persona_space.png)
![layers](layers.png)
![roles](roles.png)

| layer | cosine(axis, PC1) | PC1 explained |
|---|---|---|
{rows}
"""


def write_report(axis: AssistantAxis, out_dir: str | Path, layer: int | None = None) -> Path:
    """Write PNGs, ``report.md``, ``report.json`` and an ``index.html`` that shows them; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = summary(axis, layer)
    plot_scatter(axis, s["layer"], out / PLOTS[0])
    plot_layers(axis, out / PLOTS[1])
    plot_roles(axis, s["layer"], out / PLOTS[2])
    md = _markdown(s)
    (out / "report.md").write_text(md)
    (out / "report.json").write_text(json.dumps(s, indent=2))
    intro = "".join(f"<p>{html.escape(chunk)}</p>" for chunk in md.split("\n\n")[1:5])
    table = "".join(f"<tr><td>{i}</td><td>{c:.3f}</td><td>{e:.3f}</td></tr>"
                    for i, (c, e) in enumerate(zip(s["pc1_cosine"], s["explained_pc1"], strict=True)))
    images = "".join(f'<p><img src="{n}" style="max-width:100%"></p>' for n in PLOTS)
    page = (f"<!doctype html><meta charset='utf-8'><title>Assistant Axis report</title>"
            f"<body style='font-family:sans-serif;max-width:1100px;margin:auto'>"
            f"<h1>Assistant Axis report: {html.escape(str(s['model_id']))}</h1>{intro}{images}"
            f"<table border=1 cellpadding=3><tr><th>layer</th><th>cos(axis, PC1)</th><th>PC1 explained</th></tr>"
            f"{table}</table></body>")
    (out / "index.html").write_text(page)
    return out / "index.html"
