"""The repository stands alone: nothing tracked reads or names the shared folder that sits
beside a developer's checkout (a user's clone has nothing beside it), and the default data the
configs name is in the clone."""
import subprocess

import yaml

from alpaca_jax.paths import REPO_ROOT, resolve_path

# Built from parts so that this file does not name what it forbids.
OUTSIDE = "../" + "shared"


def _tracked_files():
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True,
                         check=True).stdout.decode()
    return [REPO_ROOT / f for f in out.split("\0") if f]


def test_no_tracked_file_reaches_outside_the_clone():
    offenders = []
    for path in _tracked_files():
        if not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        for i, line in enumerate(text.splitlines(), 1):
            if OUTSIDE in line:
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{i}: {line.strip()[:100]}")
    assert not offenders, "tracked files name " + OUTSIDE + ":\n" + "\n".join(offenders)


class _Lenient(yaml.SafeLoader):
    """lm-eval task files carry `!function` tags; their values are not paths."""


_Lenient.add_multi_constructor("!", lambda loader, tag, node: None)


def test_every_data_path_in_the_configs_is_in_the_repository():
    named = []
    yamls = [*(REPO_ROOT / "conf").rglob("*.yaml"),
             *(REPO_ROOT / "alpaca_jax" / "eval" / "tasks").glob("*.yaml")]   # lm-eval tasks
    for cfg in yamls:
        def walk(node):
            if isinstance(node, dict):
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)
            elif isinstance(node, str) and node.startswith("data/"):
                named.append((cfg, node))
        walk(yaml.load(cfg.read_text(), Loader=_Lenient))
    assert len(named) >= 7, named          # the Alpaca sample and the six zero-shot sets
    for cfg, rel in named:
        assert (REPO_ROOT / rel).is_file(), f"{cfg.relative_to(REPO_ROOT)} names missing {rel}"


def test_relative_paths_resolve_against_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)             # anywhere but the repository
    assert resolve_path("data/alpaca/alpaca_small.json") == \
        str(REPO_ROOT / "data/alpaca/alpaca_small.json")
    (tmp_path / "mine.json").write_text("[]")
    assert resolve_path("mine.json") == str(tmp_path / "mine.json")   # the user's own file
    assert resolve_path("tatsu-lab/alpaca") == "tatsu-lab/alpaca"      # a hub id, untouched
    assert resolve_path("wiki") == "wiki"                              # a built-in corpus name
    assert resolve_path(str(tmp_path / "x.json")) == str(tmp_path / "x.json")


def test_the_vendored_data_is_documented():
    readme = (REPO_ROOT / "data" / "README.md").read_text()
    for f in sorted((REPO_ROOT / "data").rglob("*")):
        if f.is_file() and f.name != "README.md":
            rel = f.relative_to(REPO_ROOT / "data").as_posix()
            assert f"`{f.name}`" in readme and rel in readme, f"data/README.md omits {rel}"
