"""Every command line of minidiff (`minidiff COMMAND ...`, wired in minidiff/cli.py). Each module has
`add_arguments(parser)` and `run(args)`; the library modules they call hold no argparse."""

# the sampler names every command accepts, written out so that `--help` needs no torch import
# (tests/test_cli_generate.py holds them equal to minidiff.schedulers.SCHEDULER_NAMES)
SCHEDULERS = ("ddim", "ddpm", "dpmpp", "dpmpp_karras", "euler", "euler_a", "euler_karras", "lms", "lms_karras", "pndm")
