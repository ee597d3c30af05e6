"""Resumable training state on orbax `CheckpointManager`s: `latest/` (keep-N, async) for
resuming, `best/` (keep 1) for the lowest validation loss.

Resume policy for a corrupt or truncated latest step (orbax still lists it as the latest;
docs/ARCHITECTURE.md, traps): warn loudly, name the step and the error, and fall back to the previous step; the
data order is a pure function of the step, so a fallback replays exactly. If no step restores,
raise with every step's error. `fallbacks` records what was skipped for results.json."""
from __future__ import annotations

import warnings
from pathlib import Path

import orbax.checkpoint as ocp


class CheckpointRestoreError(RuntimeError):
    pass


def _manager(directory: Path, max_to_keep: int, async_save: bool):
    # two managers save the same step (latest/ and best/); in a multi-process job their
    # barriers are named by step, so each needs its own prefix or the second save collides
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=directory.name))
    return ocp.CheckpointManager(directory.resolve(), options=opts, item_names=("state", "meta"))


class Checkpointer:
    def __init__(self, directory, keep: int = 2, async_save: bool = True):
        self.directory = Path(directory)
        self.latest = _manager(self.directory / "latest", keep, async_save)
        self.best = _manager(self.directory / "best", 1, async_save)
        self.fallbacks: list[dict] = []

    def save(self, step: int, state, meta: dict) -> None:
        self.latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)))

    def save_best(self, step: int, state, meta: dict) -> None:
        self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)))

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def latest_step(self):
        return self.latest.latest_step()

    def _restore(self, mngr, step, target):
        out = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def latest_meta(self) -> dict | None:
        """The JSON meta of the newest step (None when there is none or it cannot be read), so
        a run can check it was written by the same configuration before restoring any state."""
        step = self.latest.latest_step()
        if step is None:
            return None
        try:
            return self.latest.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except (ValueError, KeyError, FileNotFoundError, OSError):
            return None

    def restore_latest(self, target):
        """(step, state, meta) of the newest step that restores, or None when there is none."""
        steps = sorted(self.latest.all_steps(), reverse=True)
        errors = []
        for step in steps:
            try:
                state, meta = self._restore(self.latest, step, target)
            except (ValueError, KeyError, FileNotFoundError, OSError) as e:
                msg = f"{type(e).__name__}: {str(e)[:300]}"
                errors.append(f"step {step}: {msg}")
                self.fallbacks.append({"step": step, "error": msg})
                warnings.warn(f"checkpoint {self.directory / 'latest'} step {step} cannot be "
                              f"restored ({msg}); falling back to the previous step",
                              RuntimeWarning, stacklevel=2)
                continue
            return step, state, meta
        if errors:
            raise CheckpointRestoreError(
                f"no checkpoint in {self.directory / 'latest'} can be restored:\n  "
                + "\n  ".join(errors))
        return None

    def restore_best(self, target):
        step = self.best.latest_step()
        if step is None:
            return None
        state, meta = self._restore(self.best, step, target)
        return step, state, meta

    def close(self) -> None:
        self.wait()
        self.latest.close()
        self.best.close()
