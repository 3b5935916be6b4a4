"""``anchor export``: write an axis bundle in another tool's format (a llama.cpp control vector)."""

from __future__ import annotations

import argparse

FORMATS = ("gguf-control-vector",)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export an axis bundle for another runtime (llama.cpp control vector)",
        description=(
            "Write the axis as a steering vector toward the Assistant in llama.cpp's control-vector GGUF layout "
            "(llama-cli / llama-server --control-vector FILE). llama.cpp adds it at every token; it cannot cap."
        ),
    )
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument("--axis", required=True, help="axis bundle directory (from `anchor axis`)")
    p.add_argument("--out", required=True, help="file to write, e.g. assistant.gguf")
    p.add_argument("--coeff", type=float, default=0.5,
                   help="push toward the Assistant, in units of each layer's mean residual norm, as for "
                        "anchor.steer (default 0.5; llama.cpp's --control-vector-scaled multiplies it)")
    p.add_argument("--layers", type=int, nargs="+", metavar="L",
                   help="decoder layers to steer, numbered from 0 as in anchor and llama.cpp; 0 is not allowed "
                        "(default: the bundle's report layer)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from anchor.axis import AssistantAxis
    from anchor.export import export_control_vector

    axis = AssistantAxis.from_pretrained(args.axis)
    path = export_control_vector(axis, args.out, args.coeff, args.layers, args.overwrite)
    layers = args.layers or [axis.report_layer]
    print(f"Wrote {path}: direction.{{{','.join(map(str, sorted(set(layers))))}}}, coeff {args.coeff:g}. "
          f"Use: llama-cli -m MODEL.gguf --control-vector {path}")
    return 0
