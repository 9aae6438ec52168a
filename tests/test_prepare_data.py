"""`make data`: filling, verification against the release's hashes, and the synthetic benchmark."""

import json
import logging
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, SHARED, requires_release
from sapt.tools import prepare_data
from sapt.training.data import load_pseudo_split, load_split
from sapt.tools.prepare_data import (
    build_manifest,
    dump_manifest,
    fill_tree,
    git_blob_sha1,
    load_manifest,
    trainable_tasks,
    verify_tree,
)
from sapt.tools.synthetic import write_synthetic_benchmark

# The files ../shared lacks (README of shared/): the release's files of 4 MiB and more.
KNOWN_MISSING = sorted(
    f"CL_Benchmark/Long_Sequence/{name}"
    for name in [
        "dbpedia/train.json", "imdb/dev.json", "imdb/test.json", "multirc/dev.json", "multirc/test.json",
        "yahoo/train.json", "yahoo/dev.json", "yahoo/test.json", "yelp/dev.json", "yelp/test.json",
    ]
)
ALTERED = "CL_Benchmark/SuperNI/task001_fake_task/test.json"


def _split(outputs):
    return json.dumps({"Definition": ["Say it."], "Instances": [{"input": f"x{i}", "output": o} for i, o in
                                                                  enumerate(outputs)]}, indent=2)


@pytest.fixture
def release(tmp_path):
    """A small fake release, its manifest (with one file the release lacks) written beside it."""
    source = tmp_path / "release"
    files = {
        "CL_Benchmark/SuperNI/task001_fake_task/train.json": _split(["a", "b", "c"]),
        "CL_Benchmark/SuperNI/task001_fake_task/dev.json": _split(["a"]),
        ALTERED: _split(["a"]),
        "CL_Benchmark/Long_Sequence/fake/train.json": _split(["yes", "no"]),
        "CL_Benchmark/Long_Sequence/fake/dev.json": _split(["no"]),
        "CL_Benchmark/Long_Sequence/fake/test.json": _split(["no"]),
        "CL_Benchmark/Long_Sequence/fake/labels.json": '["yes", "no"]',
        "generated_data/lora_gen_superni_t5/SuperNI/task001_fake_task/train.json": _split([""]),
    }
    for path, text in files.items():
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        (source / path).write_text(text)
    manifest = {path: {"git_blob_sha1": git_blob_sha1(source / path), "bytes": len(text), "instances": None}
                for path, text in files.items()}
    manifest["CL_Benchmark/Long_Sequence/gone/train.json"] = {"git_blob_sha1": "0" * 40, "bytes": None,
                                                               "instances": 7}
    manifest_path = tmp_path / "manifest.json"
    manifest_path.write_text(dump_manifest(manifest))
    return source, manifest, manifest_path


def run_cli(*args, env_source=""):
    env = {**os.environ, "SAPT_DATA_SOURCE": env_source}
    return subprocess.run([sys.executable, "-m", "sapt", "prepare_data", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, timeout=120)


def snapshot(root):
    """Everything a run could change: kind, link target, bytes and mtime of every entry."""
    state = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        state[str(path.relative_to(root))] = (
            path.is_symlink(), os.readlink(path) if path.is_symlink() else None, stat.st_mtime_ns,
            path.read_bytes() if path.is_file() and not path.is_symlink() else None,
        )
    return state


def test_git_blob_sha1_is_what_git_prints(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "hello").write_bytes(b"hello\n")
    assert git_blob_sha1(tmp_path / "empty") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert git_blob_sha1(tmp_path / "hello") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_good_tree_passes_and_missing_files_are_reported(release, tmp_path):
    source, _, manifest_path = release
    dest = tmp_path / "dest"
    result = run_cli("--source", source, "--dest", dest, "--manifest", manifest_path, "--verbose")
    assert result.returncode == 0, result.stderr
    assert "CL_Benchmark/Long_Sequence: 1 of 5 files missing (gone)" in result.stderr
    assert "missing: CL_Benchmark/Long_Sequence/gone/train.json" in result.stderr
    assert "cannot be trained or evaluated" in result.stderr and "Long_Sequence/gone" in result.stderr
    assert "hash mismatch" not in result.stderr


def test_altered_file_is_named_with_exit_status_1(release, tmp_path):
    source, manifest, manifest_path = release
    dest = tmp_path / "dest"
    assert prepare_data.main(["--source", str(source), "--dest", str(dest), "--copy",
                              "--manifest", str(manifest_path)]) == 0
    data = bytearray((dest / ALTERED).read_bytes())
    data[10] ^= 1  # one byte changed, same size
    (dest / ALTERED).write_bytes(bytes(data))
    found = git_blob_sha1(dest / ALTERED)
    result = run_cli("--verify-only", "--dest", dest, "--manifest", manifest_path)
    assert result.returncode == 1
    expected = manifest[ALTERED]["git_blob_sha1"]
    assert f"{ALTERED}: hash mismatch (expected {expected}, found {found})" in result.stderr
    report = verify_tree(dest, manifest)
    assert report.altered == [ALTERED] and report.missing == ["CL_Benchmark/Long_Sequence/gone/train.json"]
    assert ALTERED not in report.ok and len(report.ok) == len(manifest) - 2
    # the altered file's task is not trainable; the intact one is
    assert trainable_tasks(dest, report=report) == {"SuperNI": [], "Long_Sequence": ["fake"]}


@pytest.mark.parametrize("mode", ["link", "copy"])
def test_fill_modes_and_idempotence(release, tmp_path, mode):
    source, manifest, manifest_path = release
    dest = tmp_path / "dest"
    (dest / "CL_Benchmark").mkdir(parents=True)
    (dest / "CL_Benchmark" / "README.md").write_text("keep me\n")
    args = ["--source", str(source), "--dest", str(dest), f"--{mode}", "--manifest", str(manifest_path)]
    assert prepare_data.main(args) == 0
    task = dest / "CL_Benchmark" / "SuperNI" / "task001_fake_task"
    if mode == "link":
        assert task.is_symlink() and task.resolve() == (source / "CL_Benchmark/SuperNI/task001_fake_task").resolve()
    else:
        assert task.is_dir() and not task.is_symlink() and not (task / "train.json").is_symlink()
    assert (dest / "CL_Benchmark" / "README.md").read_text() == "keep me\n"
    assert (dest / "generated_data/lora_gen_superni_t5/SuperNI/task001_fake_task/train.json").is_file()
    report = verify_tree(dest, manifest)
    assert not report.altered and len(report.ok) == len(manifest) - 1
    before = snapshot(dest)
    assert prepare_data.main(args) == 0
    assert snapshot(dest) == before


def test_copy_mode_fills_only_absent_files_and_never_overwrites(release, tmp_path):
    source, manifest, _ = release
    dest = tmp_path / "dest"
    fill_tree(source, dest, "copy")
    (dest / ALTERED).write_text("local edit")
    (dest / "CL_Benchmark/SuperNI/task001_fake_task/dev.json").unlink()
    stats = fill_tree(source, dest, "copy")
    assert stats["copied_files"] == 1 and (dest / ALTERED).read_text() == "local edit"
    assert verify_tree(dest, manifest).altered == [ALTERED]


def test_dangling_link_is_replaced(release, tmp_path):
    source, manifest, _ = release
    dest = tmp_path / "dest"
    link = dest / "CL_Benchmark/SuperNI/task001_fake_task"
    link.parent.mkdir(parents=True)
    link.symlink_to(tmp_path / "nowhere", target_is_directory=True)
    fill_tree(source, dest, "link")
    assert link.resolve() == (source / "CL_Benchmark/SuperNI/task001_fake_task").resolve()


def test_named_source_that_does_not_exist_is_an_error(tmp_path):
    result = run_cli("--source", tmp_path / "nope", "--dest", tmp_path / "dest")
    assert result.returncode == 2 and "nope" in result.stderr


def test_synthetic_if_missing_writes_the_demo_data_loudly(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("SAPT_DATA_SOURCE", raising=False)
    monkeypatch.setattr(prepare_data, "default_source", lambda: tmp_path / "no_shared")
    dest = tmp_path / "repo"
    with caplog.at_level(logging.INFO, logger="sapt.prepare_data"):
        assert prepare_data.main(["--synthetic-if-missing", "--dest", str(dest)]) == 0
    assert "runs on SYNTHETIC data" in caplog.text
    assert (dest / "CL_Benchmark" / "SYNTHETIC.md").is_file() and not (dest / "SYNTHETIC.md").exists()
    assert (dest / "CL_Benchmark/SuperNI/task9002_synthetic_reverse_words/train.json").is_file()
    # without the flag, no data at all is an error
    assert prepare_data.main(["--dest", str(tmp_path / "empty")]) == 2


def test_synthetic_benchmark_loads_and_is_seeded(tmp_path):
    info = write_synthetic_benchmark(tmp_path / "a", seed=0)
    assert write_synthetic_benchmark(tmp_path / "b", seed=0) == info
    write_synthetic_benchmark(tmp_path / "c", seed=1)
    tasks = info["tasks"]
    assert len(tasks["SuperNI"]) >= 4 and len(tasks["Long_Sequence"]) >= 3
    assert all(task.startswith("task") and task.split("_")[0][4:].isdigit() for task in tasks["SuperNI"])
    for benchmark, order in info["orders"].items():
        assert len(order) == 3 and set(order) <= set(tasks[benchmark])

    root = tmp_path / "a"
    assert "not the released" in (root / "SYNTHETIC.md").read_text()
    label_sets = []
    for benchmark, names in tasks.items():
        for task in names:
            sizes = {}
            for split in ("train", "dev", "test"):
                data = load_split(root / "CL_Benchmark", task, split)
                sizes[split] = len(data)
                rule = {}
                for source, target in zip(data["source"], data["target"]):  # a function of the input
                    assert rule.setdefault(source, target) == target
            assert sizes == {"train": 200, "dev": 40, "test": 40}
            targets = set(load_split(root / "CL_Benchmark", task, "train")["target"])
            if benchmark == "Long_Sequence":
                labels = json.loads((root / "CL_Benchmark" / benchmark / task / "labels.json").read_text())
                assert targets == set(labels)
            label_sets.append(frozenset(targets))
            for gen in (f"lora_gen_{'superni' if benchmark == 'SuperNI' else 'long'}_{f}" for f in ("t5", "llama")):
                pseudo = load_pseudo_split(root / "generated_data" / gen, task)
                assert len(pseudo) == 4 and set(pseudo["target"]) == {""}
    assert len(set(label_sets)) == len(label_sets)  # every task has its own label set

    def contents(path):
        return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}

    assert contents(tmp_path / "a") == contents(tmp_path / "b")
    other = contents(tmp_path / "c")
    assert other.keys() == contents(root).keys() and other != contents(root)
    before = snapshot(root)
    write_synthetic_benchmark(root, seed=0)
    assert snapshot(root) == before


def test_packaged_manifest_is_the_release_manifest():
    manifest = load_manifest()
    assert len(manifest) == 285
    assert all(set(entry) == {"git_blob_sha1", "bytes", "instances"} for entry in manifest.values())


@requires_release()
def test_packaged_manifest_is_built_from_the_releases_manifest():
    manifest = load_manifest()
    assert manifest == build_manifest(json.loads((SHARED / "DATA_MANIFEST.json").read_text()))


@requires_release()
def test_shared_release_verifies_with_only_the_known_files_missing():
    report = verify_tree(SHARED)  # the packaged manifest; hashing all of ../shared takes about a second
    assert report.altered == []
    assert sorted(report.missing) == KNOWN_MISSING
    assert len(report.ok) == len(load_manifest()) - len(KNOWN_MISSING)
    trainable = trainable_tasks(SHARED, report=report)
    assert len(trainable["SuperNI"]) == 15
    assert trainable["Long_Sequence"] == ["agnews", "amazon", "boolq", "cb", "copa", "mnli", "qqp", "rte", "sst2",
                                          "wic"]
