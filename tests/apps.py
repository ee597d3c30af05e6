"""How the tests run the experiment apps (experiments/*.py): whole runs as subprocesses in
`app_env()`, and runs that must fail on bad settings in this process (`run_app_here`).

Why `run_app_here`: a test of a bad setting fails in milliseconds, but a subprocess spends
about 3.5 s importing JAX, Hydra and lm-eval first (test_pipeline.py's one real-process case:
3.2-3.5 s). Hydra's main is called as the command line calls
it (sys.argv, its error report on stderr, exit code 1), in this process. The command line's
error path itself is still checked in a real process once (test_pipeline.py).

Tried and left out: XLA's cheap compile settings for the subprocess runs
(`--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true`). A tiny
evaluation-heavy pipeline run took 35 s instead of 48 s, but unoptimised code runs slower: a 24-step full
fine-tune's heal went 13.1 s -> 19.5 s, and the subprocess files took longer in all.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def app_env(**extra) -> dict:
    """The environment of an app started as a subprocess: this one's (the session's compilation
    cache, offline Hub, device count: tests/conftest.py) with W&B off, and `extra`."""
    return dict(os.environ, WANDB_MODE="disabled", **extra)


def run_app_here(app: str, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python experiments/<app>.py <args>`, run in this process."""
    from hydra.core.global_hydra import GlobalHydra

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    module = importlib.import_module(f"experiments.{app}")
    saved = sys.argv
    # Hydra's logging setup (logging.config.dictConfig) would close the handlers of the test
    # process's own log capture: the `none` logging configs leave logging alone. (Overrides
    # are one run of positional arguments: after -m, before --cfg.)
    flags = [a for a in args[:1] if a in ("-m", "--multirun")]
    sys.argv = [str(ROOT / "experiments" / f"{app}.py"), *flags, "hydra/job_logging=none",
                "hydra/hydra_logging=none", *args[len(flags):]]
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            # the finetune and prune aliases translate their old keys in main(config_name)
            module.main(app) if app in ("finetune", "prune") else module.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()      # so that the next compose or main starts afresh
    return code, out.getvalue(), err.getvalue()
