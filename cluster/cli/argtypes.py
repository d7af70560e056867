"""Argument types of the command line: each turns one flag's text into a value or tells argparse
why it cannot (argparse then names the flag and exits with status 2), so a bad number never
reaches the code that would fail on it with a traceback."""

from __future__ import annotations

import argparse
import math
import re

from trainers.recipe import OPTIMIZERS, TrainHparams

SEED_MAX = 2**63 - 1  # torch, numpy and Python's random all take seeds up to here


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'5MB', '500KB', '1.5G' or a plain number of bytes."""
    match = _SIZE.match(text)
    size = int(float(match[1]) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[match[2].upper()]) \
        if match else 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 500KB, 5MB)")
    return size


_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*"
                       r"(?:(\d+(?:\.\d+)?)s?)?\s*$")


def parse_duration(text: str) -> float:
    """'90s', '5m', '1h', '1h30m' or plain seconds -> seconds."""
    match = _DURATION.match(text)
    if not match or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 90s, 5m, 1h)")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive: {text!r}")
    return total


_FLOPS = re.compile(r"^\s*(\d+(?:\.\d*)?(?:e\+?\d+)?)\s*([KMGTPE]?)\s*$", re.IGNORECASE)
_FLOPS_SCALE = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15, "e": 1e18}


def parse_flops(text: str) -> float:
    """'2e13', '20T', '1.5P' -> FLOPs."""
    match = _FLOPS.match(text)
    if not match or not 0 < float(match[1]) * _FLOPS_SCALE[match[2].lower()] < math.inf:
        raise argparse.ArgumentTypeError(f"not a positive number of FLOPs: {text!r} (use e.g. "
                                         f"2e13, 20T, 1.5P)")
    return float(match[1]) * _FLOPS_SCALE[match[2].lower()]


def _checked(parse, holds, message: str):
    """An argument type: ``parse`` the text, then refuse a value for which ``holds`` is false,
    with ``message`` (formatted with the text)."""
    def check(text: str):
        value = parse(text)
        if not holds(value):
            raise argparse.ArgumentTypeError(message.format(text=text))
        return value

    return check


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


# A seed: a whole number in [0, 2**63 - 1].
seed = _checked(_int, lambda v: 0 <= v <= SEED_MAX,
                "seed {text} is out of range: use 0 to " + str(SEED_MAX))
positive_int = _checked(_int, lambda v: v >= 1, "must be a positive whole number, got {text}")
non_negative_int = _checked(_int, lambda v: v >= 0, "must be 0 or more, got {text}")
positive_float = _checked(finite_float, lambda v: v > 0, "must be positive, got {text}")
non_negative_float = _checked(finite_float, lambda v: v >= 0, "must be 0 or more, got {text}")
fraction = _checked(finite_float, lambda v: 0 <= v <= 1, "must be in [0, 1], got {text}")
share_below_one = _checked(finite_float, lambda v: 0 <= v < 1,
                           "must be in [0, 1), got {text}")
# A TCP port to listen on; 0 lets the system pick a free one.
port = _checked(_int, lambda v: 0 <= v <= 65535,
                "port {text} is out of range: use 1 to 65535, or 0 for any free port")


def add_optimizer_option(group) -> None:
    """``--optimizer``, the same flag for every command that trains from scratch."""
    group.add_argument("--optimizer", choices=OPTIMIZERS, default=TrainHparams.optimizer,
                       help="muon: Muon on the hidden matrices, AdamW on the rest "
                            "(bench/recipe_pairs.py); adamw: AdamW on every weight, the standard "
                            "recipe (default: %(default)s)")
