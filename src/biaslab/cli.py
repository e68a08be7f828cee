"""biaslab command line: a thin layer over the Python API. Errors print one clear line, never a traceback
(set BIASLAB_DEBUG=1 for one)."""
from __future__ import annotations

import os
import sys

from rich.markup import escape

from .commands import bbq, core, mitigate, rewrite, softprompt  # noqa: F401  (each registers its commands)
from .commands._app import app, err_console, mitigate_app, probe_app  # noqa: F401
from .errors import BiaslabError


INTERRUPTED = "interrupted; finished work is kept in the run directory: rerun the same command to resume"
RUN_DIR_COMMANDS = frozenset({"audit", "mitigate", "probe", "score", "rewrite"})   # those whose --out resumes


def writes_a_run_dir(argv: list[str]) -> bool:
    """Whether ``argv`` runs a command into a run directory (finished chunks survive an interruption): ``--out``
    (``-o`` too, except for ``rewrite``, where ``-o`` is its one-file ``--output``)."""
    name = next((a for a in argv if not a.startswith("-")), None)
    flags = {"--out"} if name == "rewrite" else {"--out", "-o"}
    return name in RUN_DIR_COMMANDS and any(a in flags or a.startswith("--out=") for a in argv)


def interrupted_message() -> str:
    return INTERRUPTED if writes_a_run_dir(sys.argv[1:]) else "interrupted"


def quiet_libraries() -> None:
    """Library warnings (deprecations, transformers' advice) stay out of the console; BIASLAB_DEBUG=1 keeps them.
    biaslab's own warnings print as one ``warning: …`` line."""
    import warnings

    default_format, ours = warnings.formatwarning, os.path.dirname(os.path.abspath(__file__)) + os.sep

    def one_line(message, category, filename, lineno, line=None):   # biaslab's own warnings: one line each
        if os.path.abspath(filename).startswith(ours):
            return f"warning: {message}\n"
        return default_format(message, category, filename, lineno, line)

    warnings.formatwarning = one_line
    if os.environ.get("BIASLAB_DEBUG"):
        return

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")   # c10d's retry logs and C++ stacks: our one line says it
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for mod in ("transformers", "torch", "accelerate", "peft", "gguf", "huggingface_hub", "sentence_transformers"):
        warnings.filterwarnings("ignore", module=mod)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


# commands with no work to share between ranks (no model scoring, or one pass that writes one directory): under
# torchrun, rank 0 runs them alone (several ranks would repeat the work; export failed on ranks other than 0, where
# transformers' save_pretrained writes nothing once a process group exists)
ONE_PROCESS_COMMANDS = frozenset({"export", "check", "compare", "score", "bbq-generate", "models", "benchmarks"})


def join_process_group() -> None:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1): join the group; ranks other than 0 print nothing but
    errors (rank 0 prints the results and writes the run directory)."""
    from . import distributed as D

    from . import launchers

    if not D.init_from_env():
        return
    commands = D.all_gather(sys.argv[1:])   # ranks started by hand (or by a script) with other arguments would
    for r, argv in enumerate(commands):     # cut other chunks and wait on each other's collectives
        if argv != commands[0]:
            import shlex

            if launchers.adopted == "slurm":   # srun tasks given their own commands: independent jobs, as before
                _run_alone("note: the srun tasks run different commands, so each runs alone (tasks with the same "
                           "command run as one job)")
                return
            raise BiaslabError(f"rank {r} was started with another command than rank 0 (`biaslab {shlex.join(argv)}` "
                               f"vs `biaslab {shlex.join(commands[0])}`): every rank must run the same command")
    name = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if name in ONE_PROCESS_COMMANDS:   # nothing to share: rank 0 runs it as one process, the others stop now
        main_rank, world = D.is_main(), D.world_size()
        _run_alone(f"note: `biaslab {name}` runs in one process: the {world - 1} other rank(s) of this launch had "
                   "nothing to do and have stopped" if main_rank else None)
        if not main_rank:
            sys.exit(0)
        return
    if not D.is_main():
        from .progress import set_quiet

        set_quiet(True)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)
        err_console.quiet = True            # notes too; errors are printed (main() turns it back on)


def _run_alone(note: str | None) -> None:
    """Leave the process group and the launcher's adopted variables: this process then runs as one (``note`` says
    why, on stderr)."""
    from . import launchers

    leave_process_group()
    launchers.undo_adoption()
    if note:
        err_console.print(note, markup=False, highlight=False, soft_wrap=True)


def leave_process_group() -> None:
    """After a command that finished: the ranks leave together (a barrier, then the group is destroyed), since a rank
    that exits while a peer still tears gloo down can abort ("terminate called without an active exception")."""
    from . import distributed as D

    if D.world_size() > 1:
        import torch.distributed as dist

        D.barrier()
        dist.destroy_process_group()


OOM_ADVICE = {   # what lowers the memory one step needs, by command (checked in tests against the real options)
    "crispr": "--checkpoint-layers, --layers-per-pass 1 or a lower --token-budget (attribution)",
    "srllm": "--micro-batch-size 1 (training in parts gives the same adapters as one process with that size)",
    "fast": "--micro-batch-pairs 1 (training in parts)",
    "softprompt": "--micro-batch-size 1 (training in parts)",
}


def out_of_memory_message(e: BaseException, argv: list[str]) -> str | None:
    """One line for a GPU (or MPS) out-of-memory error: torch's own first line, that finished work is kept, and
    what lowers the memory of the command in ``argv``; None for any other error."""
    import torch

    text = str(e)
    if not (isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in text)):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    first = first.split(" Including non-PyTorch memory")[0].split(" Of the allocated memory")[0]
    advice = next((v for k, v in OOM_ADVICE.items() if k in argv), None)
    kept = " Finished chunks are kept in the run directory." if writes_a_run_dir(argv) else ""
    return (f"out of memory: {first}{kept} Rerun with " + (f"{advice}, " if advice else "")
            + "--device-map auto to spread the model over more devices (with --max-memory to leave room for "
            "activations), or in bfloat16 (--dtype bfloat16) where it ran in float32")


def main() -> None:
    """Run the CLI. Every BiaslabError is one line (exit 2); Ctrl-C prints how to resume (exit 130): the app runs
    in non-standalone mode, because typer's standalone mode turns an interrupt into a silent exit 130."""
    quiet_libraries()
    try:
        join_process_group()
        rv = app(standalone_mode=False)
        leave_process_group()
    except BiaslabError as e:
        from . import distributed as D

        if os.environ.get("BIASLAB_DEBUG"):
            raise
        if D.post_error(str(e)):   # False in one process
            sys.exit(2)   # rank 0 prints this very line: N ranks failing one check printed N copies of it
        err_console.quiet = False
        where = f"rank {D.rank()}: " if D.rank() else ""
        # the message may quote user input (paths, field values): escaped, so "[...]" in it is printed, not parsed
        err_console.print(f"[bold red]error:[/] {where}{escape(str(e))}", highlight=False, soft_wrap=True)
        D.linger_for_errors()
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print(interrupted_message(), markup=False, highlight=False, soft_wrap=True)
        sys.exit(130)
    except Exception as e:  # click's usage errors and aborts, shown as typer shows them
        from . import distributed as D

        err_console.quiet = False
        oom = out_of_memory_message(e, sys.argv[1:])
        if oom:
            where = f"rank {D.rank()}: " if D.world_size() > 1 else ""
            err_console.print(f"error: {where}{oom}", markup=False, highlight=False, soft_wrap=True)
            sys.exit(2)
        if D.world_size() > 1 and D.is_peer_failure(e):
            err_console.print(f"error: rank {D.rank()}: {D.peer_failure_message(e)}", markup=False,
                              highlight=False, soft_wrap=True)
            sys.exit(2)
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            from typer import rich_utils

            if not D.is_main():   # a usage error: every rank parsed the same arguments (checked), rank 0 shows it
                sys.exit(e.exit_code)

            rich_utils.rich_format_error(e)
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            err_console.print("Aborted.", markup=False)
            sys.exit(1)
        raise
    if rv == 130:  # typer turned a Ctrl-C inside a command into Exit(130)
        err_console.print(interrupted_message(), markup=False, highlight=False, soft_wrap=True)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
