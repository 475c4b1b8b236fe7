"""Every command line of minidiff (`minidiff COMMAND ...`, wired in minidiff/cli.py). Each module has
`add_arguments(parser)` and `run(args)`; the library modules they call hold no argparse."""
import argparse

# the sampler names every command accepts, written out so that `--help` needs no torch import
# (tests/test_cli_generate.py holds them equal to minidiff.schedulers.SCHEDULER_NAMES)
SCHEDULERS = ("ddim", "ddpm", "dpm2", "dpm2_a", "dpm2_a_karras", "dpm2_karras", "dpmpp", "dpmpp_karras", "dpmpp_sde",
              "dpmpp_sde_karras", "euler", "euler_a", "euler_karras", "heun", "heun_karras", "lcm", "lms",
              "lms_karras", "pndm", "unipc", "unipc_karras")
SCHEDULER_HELP = (f"one of {', '.join(SCHEDULERS)}, or an AUTOMATIC1111 name such as 'DPM++ 2M Karras', 'Euler a', "
                  "'UniPC', 'LCM' (any case)")


def scheduler_name(text: str) -> str:
    """argparse type of every --scheduler: any sampler name minidiff.schedulers.resolve knows (minidiff's,
    AUTOMATIC1111's, any case) -> minidiff's name; an unknown one is a usage error that lists the known ones."""
    from ..schedulers import resolve  # imports torch: only when the option is given, so `--help` stays light
    try:
        return resolve(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
