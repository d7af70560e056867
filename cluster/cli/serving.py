"""``chimera serve``: load a model directory and serve its chat page and OpenAI-compatible API
(127.0.0.1 unless told otherwise)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from chimera.generation import SamplingConfig
from chimera.inference import load_pretrained
from cluster.cli import argtypes, listening
from cluster.cli.errors import CommandError, settings_errors
from cluster.serve import ChatService, Limits, make_server


def cmd_serve(args: argparse.Namespace, console: Console) -> int:
    try:
        model, tokenizer = load_pretrained(args.model, args.quantize)
        limits = Limits(max_message_chars=args.max_message_chars,
                        max_messages=args.max_messages, max_new_tokens=args.max_tokens_limit)
        defaults = SamplingConfig(max_new_tokens=min(200, args.max_tokens_limit),
                                  temperature=0.8, top_p=0.95)
        service = ChatService(model, tokenizer, Path(args.model).resolve().name, limits,
                              defaults)
    except settings_errors() as err:
        raise CommandError(str(err)) from None
    # bound apart from loading: a missing model directory is an OSError too, not a taken port
    server = listening.bind(lambda host, port: make_server(service, host, port),
                            args.host, args.port)
    return listening.serve(server, console, f"[bold]Wyrd[/bold] serving {args.model}",
                           "anyone who can reach it can use the model",
                           [f"OpenAI-compatible API: {server.own_origin()}/v1, "
                            f"model {service.name!r}"])

def register(commands) -> None:
    """Add ``chimera serve`` to the main parser."""
    serve = commands.add_parser(
        "serve", help="a web chat page (Wyrd) and an OpenAI-compatible API for a model",
        description="Serve one chat page and an OpenAI-compatible API, /v1/chat/completions "
                    "(see README: Web chat). Binds to 127.0.0.1 unless told otherwise.")
    serve.add_argument("model", metavar="MODEL")
    serve.add_argument("--host", default="127.0.0.1",
                       help="the address to listen on; requests must name it (or localhost) "
                            "as their Host")
    # Checked by argparse, so a bad port is a usage error and not a traceback from bind(), and
    # a limit of 0 (which would refuse every request) is refused at the start.
    serve.add_argument("--port", type=argtypes.port, default=8000, help="0 picks a free port")
    serve.add_argument("--quantize", type=int, choices=[8], default=None)
    serve.add_argument("--max-message-chars", type=argtypes.positive_int,
                       default=Limits.max_message_chars)
    serve.add_argument("--max-messages", type=argtypes.positive_int,
                       default=Limits.max_messages)
    serve.add_argument("--max-tokens-limit", type=argtypes.positive_int,
                       default=Limits.max_new_tokens,
                       help="the most tokens one reply may ask for (a reply also stops where "
                            "the model's context ends)")
    serve.set_defaults(handler=cmd_serve)
