"""Every command line of minidiff (`minidiff COMMAND ...`, wired in minidiff/cli.py). Each module has
`add_arguments(parser)` and `run(args)`; the library modules they call hold no argparse.

Bad input, the same way in every command: `run` first checks its flags with minidiff.settings (a table FLAGS_FIELDS
of the flags with a constraint: check_flags), before it loads a model or writes a file, and lets the library's own
door (generate()'s, FinetuneConfig's) check the rest. It catches nothing: minidiff/cli.py prints every error meant
for the user (minidiff.errors) as one line `minidiff COMMAND: error: ...` naming the flag, and exits 2. A module may
set FLAGS = {library argument: its flag} where the two names differ (generate's guidance_scale is --guidance)."""
import argparse
import contextlib
import errno

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


def seed_list(text: str) -> tuple:
    """argparse type of --seeds / --validation-seeds: "0,1,7" -> (0, 1, 7); anything else is a usage error that
    names the flag (argparse adds it)."""
    from ..settings import SEED_MAX
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        seeds = None
    if not seeds or not all(0 <= s <= SEED_MAX for s in seeds):
        raise argparse.ArgumentTypeError(f"must be comma-separated seeds, ints in [0, {SEED_MAX}], got {text!r}")
    return seeds


def load_model(path, field: str = "model", **kw):
    """minidiff.load(path, **kw); a file that is not a model (CheckpointError) is refused naming the flag of
    `field` (minidiff/cli.py adds it to the message)."""
    from ..checkpoint import load
    from ..formats.weights import CheckpointError
    try:
        return load(path, **kw)
    except CheckpointError as e:
        raise CheckpointError(str(e), field=field) from None


@contextlib.contextmanager
def listening(host: str, port: int):
    """Around binding a server: an address in use or not this machine's is refused naming --host / --port (the
    system's message alone does not say which address)."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise
        from ..errors import InputValueError
        raise InputValueError(f"cannot listen on {host}:{port} (--host / --port): {e.strerror}", field="port") from None


def check_flags(args, fields: dict, rules=()) -> None:
    """A command's flags against their table (minidiff.settings): types, ranges and the rules between them, then the
    paths and devices as this machine has them. Run first in `run`, before anything is loaded or written."""
    from ..settings import check_on_this_machine, check_settings
    check_settings(args, fields, rules)
    check_on_this_machine(args, fields)


def read_prompt_file(path, flag: str) -> list:
    """The prompts of a --prompts / --validation-prompts file (minidiff.compare.read_prompts: one per line, '#'
    comments); a file that is missing, not text, or holds no prompt is an InputValueError naming the flag."""
    from ..compare import read_prompts
    from ..errors import InputError, InputValueError
    from ..settings import File, check_on_this_machine
    field = flag.lstrip("-").replace("-", "_")
    check_on_this_machine(argparse.Namespace(**{field: path}), {field: File(what="a text file, one prompt per line",
                                                                            flag=flag)})
    try:
        return read_prompts(path)
    except InputError as e:                       # not text, or no prompt in it: say which flag gave the file
        raise InputValueError(f"{flag} {e}", field=field) from None
