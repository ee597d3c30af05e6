"""Test environment: set before jax or wandb initialise (docs/ARCHITECTURE.md, traps)."""
import os
import shutil
import tempfile

# Temporary directories this process made (not ones inherited from an xdist controller through
# the environment); removed when the session ends, so repeated runs leave nothing in /tmp.
_MADE = []


def _temp_dir_env(name: str, prefix: str) -> None:
    if name not in os.environ:
        os.environ[name] = tempfile.mkdtemp(prefix=prefix)
        _MADE.append(os.environ[name])


os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_temp_dir_env("HF_HOME", "alpaca_jax_hf_home_")
# One compilation cache for the whole session, its xdist workers and the runs they start as
# subprocesses: the same tiny shapes are compiled by many tests and by every restart of a run
# (SIGKILL, resume, multi-process tests), so most compiles after the first are cache reads.
# Environment variables, not jax.config, so that subprocesses inherit them.
_temp_dir_env("JAX_COMPILATION_CACHE_DIR", "alpaca_jax_compile_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# The files that run end-to-end jobs in subprocesses take minutes each. `make test` hands whole
# files to its workers in collection order, so these go first: the short files then fill the
# gaps, instead of one worker finishing a long file alone at the end. (Order only; every test
# still runs.)
LONG_FILES = ("test_pipeline.py", "test_multihost.py", "test_finetune_experiment.py",
              "test_export_smollm2.py", "test_recipe.py", "test_export_experiment.py",
              "test_mesh.py", "test_train.py", "test_readme.py", "test_file_types.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)
    items.sort(key=rank)    # stable: the order within a file is kept


def pytest_unconfigure(config):
    for d in _MADE:
        shutil.rmtree(d, ignore_errors=True)
