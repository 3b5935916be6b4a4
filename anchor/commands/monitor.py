"""``anchor monitor``: where each assistant turn of a conversation sits on the Assistant Axis, as a table and plot."""

from __future__ import annotations

import argparse

from anchor.commands.options import add_axis_options, add_model_options, load_model_and_axis


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
    add_model_options(p)
    add_axis_options(p)
    p.add_argument("--cap", action="store_true", help="also read it with the bundle's default cap on")
    p.add_argument("--layer", type=int, default=None, help="layer to read (default: the axis's report layer)")
    p.add_argument("--plot", default=None, help="write the per-turn trajectory plot to this PNG")
    p.add_argument("--out", default=None, help="write the projections to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out or --plot file")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from anchor.chat import Intervention, projection_bar
    from anchor.io import atomic_write_json, check_output_file
    from anchor.monitor import default_band, monitor_many, read_conversations, resolve_layer, summary_table, turn_means

    for flag, path in (("--out", args.out), ("--plot", args.plot)):
        if path:
            check_output_file(path, flag, args.overwrite)
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
        atomic_write_json(args.out, payload)
        print(f"JSON: {args.out}")
    return 0


def _note_cap_band(axis: object, layer: int) -> None:
    """Say when capping cannot change the reading: on fixed text, only layers from the band's first one on move."""
    from anchor.capping import default_cap_layers

    band = default_cap_layers(axis)
    if layer < min(band):
        print(f"Note: layer {layer} is below the capped band ({min(band)}–{max(band)}), so on this fixed text the "
              f"capped reading equals the uncapped one; pass --layer {max(band)} or later to see the cap act.")
