"""``anchor chat``: a terminal chat that shows where each reply sits on the Assistant Axis, optionally capped."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from anchor.commands.options import add_axis_options, add_model_options, load_model_and_axis


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat", help="chat in the terminal and watch each reply's projection on the Assistant Axis",
        description=(
            "Type a message per line; each reply is printed with the mean projection of its tokens at the report "
            "layer and a gauge ('=' is the default-Assistant band, '#' the reply). /reset starts over, /quit (or "
            "end of input, or Ctrl-C) stops. Reads stdin, so `anchor chat < lines.txt` works too."
        ),
    )
    add_model_options(p)
    add_axis_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar while a default axis is computed")
    p.add_argument("--cap", action="store_true", help="cap with the bundle's default setting")
    p.add_argument("--steer", type=float, default=None, metavar="C",
                   help="steer by C × the layer's mean residual norm (positive: toward the Assistant)")
    p.add_argument("--side-by-side", action="store_true",
                   help="answer each message uncapped and with --cap/--steer (default --cap), one history each")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--system", default=None, help="a system prompt for the conversation")
    p.add_argument("--layer", type=int, default=None, help="layer to read (default: the axis's report layer)")
    p.set_defaults(func=run)


def _stdin_lines() -> Iterator[str]:
    while True:
        try:
            yield input("you> ")
        except EOFError:
            return


def run(args: argparse.Namespace) -> int:
    from anchor.chat import ChatSession, Intervention, chat_loop

    chosen = Intervention(cap=args.cap, steer=args.steer)
    if args.side_by_side and chosen == Intervention():
        chosen = Intervention(cap=True)
    interventions = [Intervention(), chosen] if args.side_by_side else [chosen]
    model, tokenizer, axis = load_model_and_axis(args)
    sessions = [
        ChatSession(model, tokenizer, axis, i, args.max_new_tokens, args.system, args.layer, not args.no_check_weights)
        for i in interventions
    ]
    print(f"Chatting with {args.model} ({', '.join(i.label for i in interventions)}). /reset starts over, /quit "
          "or Ctrl-C stops.")
    try:
        chat_loop(sessions, _stdin_lines())
    except KeyboardInterrupt:  # the natural way out of a terminal chat: leave quietly
        print()
    return 0
