"""``anchor monitor``: where each assistant turn of a conversation sits on the Assistant Axis, as a table and plot.

Also home of the model-and-axis options shared by ``anchor chat``, ``anchor generate`` and ``anchor eval``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model, --axis, --device, --dtype, --no-check-weights, --quiet: how to get the model and its axis."""
    parser.add_argument("--model", default="smollm2", help="hub id, local directory, or 'smollm2' (embedded, default)")
    parser.add_argument("--axis", default=None,
                        help="axis bundle directory (from `anchor axis`); default: a small axis computed once per "
                             "model and cached (anchor.evaluate.default_axis)")
    parser.add_argument("--device", default=None, help="e.g. cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="fp32 (default), bf16 or fp16")
    parser.add_argument("--no-check-weights", action="store_true",
                        help="accept a fine-tune of the model the axis was computed on (shapes are still checked)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def load_model_and_axis(args: argparse.Namespace) -> tuple[object, object, object]:
    """The model, tokenizer and axis the shared options name; the axis is checked against the model."""
    import torch

    from anchor.axis import AssistantAxis
    from anchor.evaluate import default_axis
    from anchor.models import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, device=device, dtype=args.dtype)
    if args.axis:
        axis = AssistantAxis.from_pretrained(args.axis)
    else:
        print("No --axis given: using the cached default axis of this model (computed on first use).")
        axis = default_axis(model, tokenizer, progress=not args.quiet)
    axis.check_compatible(model, check_weights=not args.no_check_weights)
    return model, tokenizer, axis


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "monitor", help="per-turn Assistant-Axis projections of a conversation (drift), as a table and plot",
        description=(
            "Read a conversation teacher-forced and report, for each assistant turn, the mean (± per-token std) "
            "projection of its tokens on the Assistant Axis. A .json file holds one conversation (a messages list "
            "or {\"messages\": [...]}); a .jsonl file holds one per line and gives a summary table."
        ),
    )
    p.add_argument("conversation", help="a .json conversation or a .jsonl file of conversations")
    add_model_args(p)
    p.add_argument("--cap", action="store_true", help="also read it with the bundle's default cap on")
    p.add_argument("--layer", type=int, default=None, help="layer to read (default: the axis's report layer)")
    p.add_argument("--plot", default=None, help="write the per-turn trajectory plot to this PNG")
    p.add_argument("--out", default=None, help="write the projections to this JSON file")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from anchor.chat import Intervention, projection_bar
    from anchor.monitor import default_band, monitor_many, read_conversations, resolve_layer, summary_table, turn_means

    records = read_conversations(args.conversation)
    model, tokenizer, axis = load_model_and_axis(args)
    layer = resolve_layer(axis, args.layer)
    settings = [Intervention()] + ([Intervention(cap=True)] if args.cap else [])
    traces = {}
    for setting in settings:
        with setting.apply(model, axis, not args.no_check_weights):
            traces[setting.label] = monitor_many(
                model, tokenizer, axis, [r["messages"] for r in records], layer, args.batch_size,
                not args.no_check_weights, progress=not args.quiet,
            )
    if args.cap:
        _note_cap_band(axis, layer)
    names = [str(r.get("id", f"#{n + 1}")) for n, r in enumerate(records)]
    lo, hi = default_band(axis, layer)
    print(f"Layer {layer}; default-Assistant band {lo:.2f}–{hi:.2f} (25th–75th percentile of default answers).")
    for label, trace_list in traces.items():
        print(f"\n{label}:")
        if len(records) == 1:
            trace = trace_list[0]
            for k, (mean, std) in enumerate(zip(trace.per_turn, trace.std_per_turn, strict=True)):
                print(f"  turn {k + 1}: {projection_bar(mean, axis, layer)}  std {std:.2f}, "
                      f"{trace.per_token[k].numel()} tokens")
        else:
            print(summary_table(trace_list, names))
    if args.plot:
        from anchor.monitor import plot_trajectories

        if len(records) == 1:
            series = {label: (t[0].per_turn, t[0].std_per_turn) for label, t in traces.items()}
            title = f"{names[0]}: per-turn mean ± per-token std, layer {layer}"
        else:
            series = {label: tuple(zip(*turn_means(t), strict=True)) for label, t in traces.items()}
            title = f"{len(records)} conversations: mean ± sem, layer {layer}"
        plot_trajectories(series, (lo, hi), args.plot, title=title)
        print(f"\nPlot: {args.plot}")
    if args.out:
        payload = {
            "layer": layer, "default_band": [lo, hi],
            "conversations": [
                {"id": name, **{label: traces[label][n].to_dict() for label in traces}} for n, name in enumerate(names)
            ],
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=1, allow_nan=True), encoding="utf-8")
        print(f"JSON: {args.out}")
    return 0


def _note_cap_band(axis: object, layer: int) -> None:
    """Say when capping cannot change the reading: on fixed text, only layers from the band's first one on move."""
    from anchor.capping import default_cap_layers

    band = default_cap_layers(axis)
    if layer < min(band):
        print(f"Note: layer {layer} is below the capped band ({min(band)}–{max(band)}), so on this fixed text the "
              f"capped reading equals the uncapped one; pass --layer {max(band)} or later to see the cap act.")
