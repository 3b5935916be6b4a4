"""``anchor import-axis``: turn the paper's published axis (and capping setting) into an ordinary bundle."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-axis", help="import the paper's published assistant_axis.pt / capping_config.pt as a bundle",
        description=(
            "Read the Assistant Axis released with Lu et al. 2026 (assistant_axis.pt) and optionally one experiment "
            "of its capping_config.pt, convert the cap-from-above to this project's floor with the sign checked, "
            "and write an axis bundle that `cap`, `anchor chat --cap` and `anchor monitor` read. Files are loaded "
            "with torch.load(weights_only=True) only."
        ),
    )
    p.add_argument("--axis-file", required=True, help="the release's assistant_axis.pt")
    p.add_argument("--capping-file", help="the release's capping_config.pt (Qwen 3 32B, Llama 3.3 70B)")
    p.add_argument("--experiment", help="experiment id in the capping file (default: the only or the recommended "
                                        "one, layers_46:54-p0.25 for Qwen 3 32B, layers_56:72-p0.25 for Llama)")
    p.add_argument("--model", help="hub id, local directory or .gguf whose config checks the shapes (no weights "
                                   "are loaded)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a bundle already in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from anchor.axis import CONFIG_NAME, WEIGHTS_NAME, AssistantAxis
    from anchor.io import check_output_dir

    out = check_output_dir(args.out, (WEIGHTS_NAME, CONFIG_NAME), overwrite=args.overwrite)
    axis = AssistantAxis.from_official(args.axis_file, args.capping_file, args.experiment, args.model)
    axis.save_pretrained(out)
    print(f"Imported a {axis.n_layers}-layer axis of width {axis.hidden_size} into {out}.")
    setting = axis.metadata.get("cap")
    if setting:
        cosines = axis.metadata["imported_from"]["capping_cosines"].values()
        print(f"Capping setting {axis.metadata['imported_from']['experiment']}: layers {setting['layers'][0]}-"
              f"{setting['layers'][-1]}, floors on the flipped capping vectors (cosine with the axis "
              f"{min(cosines):+.3f} to {max(cosines):+.3f}).")
    return 0
