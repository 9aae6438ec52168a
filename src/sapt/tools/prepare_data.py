"""Data preparation (`make data`): bring the released benchmark into the project and verify it.

    python -m sapt prepare_data [--source PATH] [--dest .] [--verify-only] [--synthetic-if-missing]
                                [--link | --copy] [--verbose] [--manifest PATH]
    python -m sapt prepare_data --synthetic --dest DIR [--seed 0]

The release (a folder holding ``CL_Benchmark/`` and/or ``generated_data/``) is found at ``--source``,
else ``$SAPT_DATA_SOURCE``, else ``../shared`` beside the working directory (a checkout's root, where
``make data`` runs; never beside the installed package). Each task folder is symlinked
(or, with ``--copy``, copied) into ``<dest>/CL_Benchmark`` and ``<dest>/generated_data``; nothing that
already exists there is overwritten, so the command is idempotent. Every file named in the packaged
``manifest.json`` (the release's git blob SHA-1s) is then hashed: missing files are a warning (the
tasks they belong to cannot be trained), altered files are named one per line.

Exit status: 0 when every present file matches, 1 when any file is altered, 2 when no data is found
(or a named source does not exist).

``--synthetic`` writes a small seeded benchmark in the release's format, learnable by a tiny model, for
machines without the release; ``--synthetic-if-missing`` does so into ``<dest>`` when no release exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..training.data import BENCHMARKS
from ..utils.cli import OneLineArgumentParser
from ..utils.fileio import atomic_path, write_bytes_if_changed
from ..utils.logs import setup_cli_logging
from .synthetic import write_synthetic_benchmark

logger = logging.getLogger("sapt.prepare_data")

MANIFEST_PATH = Path(__file__).with_name("manifest.json")
SOURCE_ENV = "SAPT_DATA_SOURCE"
# Top-level folders of a release and the depth of their task folders below them:
# CL_Benchmark/<benchmark>/<task>, generated_data/<lora_gen_x>/<benchmark>/<task>.
RELEASE_FOLDERS = {"CL_Benchmark": 2, "generated_data": 3}
EXIT_OK, EXIT_ALTERED, EXIT_NO_DATA = 0, 1, 2
_CHUNK = 1 << 20


class SourceError(RuntimeError):
    """A named data source (argument or environment variable) that is not a release folder."""


# --------------------------------------------------------------------------------------------------
# Manifest


def build_manifest(release_manifest: dict) -> dict:
    """The compact packaged manifest (path -> git_blob_sha1, bytes, instances) from the release's
    DATA_MANIFEST.json. Files absent from the shared copy carry `instances_expected` and no size there;
    both are normalised here (unknown values are null)."""
    compact = {}
    for path in sorted(release_manifest):
        entry = release_manifest[path]
        compact[path] = {
            "git_blob_sha1": entry["git_blob_sha1"],
            "bytes": entry.get("bytes"),
            "instances": entry.get("instances", entry.get("instances_expected")),
        }
    return compact


def dump_manifest(manifest: dict) -> str:
    """One entry per line: small, diff-friendly and still plain JSON."""
    lines = [f"  {json.dumps(path)}: {json.dumps(manifest[path])}" for path in sorted(manifest)]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_manifest(release_manifest_path: str | Path, out_path: str | Path = MANIFEST_PATH) -> dict:
    """Regenerate the packaged manifest from a release's DATA_MANIFEST.json."""
    manifest = build_manifest(json.loads(Path(release_manifest_path).read_text(encoding="utf-8")))
    write_bytes_if_changed(Path(out_path), dump_manifest(manifest).encode("utf-8"))
    logger.info("wrote %s (%d files)", out_path, len(manifest))
    return manifest


def load_manifest(path: str | Path | None = None) -> dict:
    return json.loads(Path(path or MANIFEST_PATH).read_text(encoding="utf-8"))


def task_folder(relpath: str) -> str:
    """The task folder of a release path (CL_Benchmark/<b>/<task> or generated_data/<g>/<b>/<task>)."""
    parts = relpath.split("/")
    return "/".join(parts[: RELEASE_FOLDERS.get(parts[0], len(parts) - 2) + 1])


# --------------------------------------------------------------------------------------------------
# Verification


def git_blob_sha1(path: str | Path) -> str:
    """What `git hash-object FILE` prints: sha1 over b"blob <size>\\0" + content, streamed."""
    path = Path(path)
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Report:
    """Outcome of verifying a tree against the manifest; paths are relative, '/'-separated."""

    root: Path
    manifest: dict
    ok: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    altered: list[str] = field(default_factory=list)
    found: dict[str, str] = field(default_factory=dict)  # altered path -> hash found (or why unreadable)
    bytes_hashed: int = 0
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.altered

    def mismatch_lines(self) -> list[str]:
        return [
            f"{path}: hash mismatch (expected {self.manifest[path]['git_blob_sha1']}, found {self.found[path]})"
            for path in self.altered
        ]

    def missing_by_folder(self) -> dict[str, tuple[int, int, list[str]]]:
        """benchmark folder -> (missing files, files listed, task names affected)."""
        listed, missing, tasks = defaultdict(int), defaultdict(int), defaultdict(set)
        for path in self.manifest:
            listed[task_folder(path).rsplit("/", 1)[0]] += 1
        for path in self.missing:
            folder, task = task_folder(path).rsplit("/", 1)
            missing[folder] += 1
            tasks[folder].add(task)
        return {folder: (missing[folder], listed[folder], sorted(tasks[folder])) for folder in sorted(missing)}

    def untrainable_tasks(self) -> list[str]:
        """'<benchmark>/<task>' of every benchmark task with a missing or altered file."""
        bad = {task_folder(p) for p in self.missing + self.altered if p.startswith("CL_Benchmark/")}
        return sorted(folder.split("/", 1)[1] for folder in bad)


def verify_tree(root: str | Path, manifest: dict | None = None) -> Report:
    """Hash every manifest file under `root` (a folder holding CL_Benchmark/ and generated_data/)."""
    root = Path(root)
    manifest = load_manifest() if manifest is None else manifest
    report = Report(root=root, manifest=manifest)
    start = last_log = time.monotonic()
    for number, path in enumerate(sorted(manifest), 1):
        file = root / path
        if not file.exists():
            report.missing.append(path)
            continue
        try:
            found = git_blob_sha1(file)
            report.bytes_hashed += file.stat().st_size
        except OSError as err:  # a folder or unreadable file where a data file should be
            found = f"unreadable ({err.strerror or err})"
        if found == manifest[path]["git_blob_sha1"]:
            report.ok.append(path)
        else:
            report.altered.append(path)
            report.found[path] = found
        if time.monotonic() - last_log > 2.0:
            last_log = time.monotonic()
            logger.info("verified %d/%d files (%.0f MB)", number, len(manifest), report.bytes_hashed / 1e6)
    report.seconds = time.monotonic() - start
    logger.info(
        "verified %s: %d ok, %d missing, %d altered (%.0f MB hashed in %.1f s)", root, len(report.ok),
        len(report.missing), len(report.altered), report.bytes_hashed / 1e6, report.seconds,
    )
    return report


def trainable_tasks(root: str | Path, manifest: dict | None = None, report: Report | None = None) -> dict:
    """benchmark -> sorted task names whose benchmark files (train/dev/test, and labels for Long
    Sequence) are all present and match the release."""
    report = report or verify_tree(root, manifest)
    ok = set(report.ok)
    by_task = defaultdict(list)
    for path in report.manifest:
        if path.startswith("CL_Benchmark/"):
            by_task[task_folder(path)].append(path)
    result = {benchmark: [] for benchmark in BENCHMARKS}
    for folder, paths in sorted(by_task.items()):
        if all(p in ok for p in paths):
            _, benchmark, task = folder.split("/")
            result.setdefault(benchmark, []).append(task)
    return result


def log_report(report: Report, verbose: bool = False) -> None:
    for line in report.mismatch_lines():
        logger.error("%s", line)
    for folder, (count, listed, tasks) in report.missing_by_folder().items():
        logger.warning("%s: %d of %d files missing (%s)", folder, count, listed, ", ".join(tasks))
    if verbose:
        for path in report.missing:
            logger.warning("missing: %s", path)
    untrainable = report.untrainable_tasks()
    if untrainable:
        logger.warning("cannot be trained or evaluated from %s: %s", report.root, ", ".join(untrainable))
    if report.altered:
        logger.error(
            "%d file(s) differ from the release: remove them and run `make data` again with a good source",
            len(report.altered),
        )


# --------------------------------------------------------------------------------------------------
# Filling <dest> from a source


def default_source() -> Path:
    """../shared beside the working directory: read where the command runs, wherever sapt is installed."""
    return Path.cwd().parent / "shared"


def is_release_folder(path: Path) -> bool:
    return any((path / name).is_dir() for name in RELEASE_FOLDERS)


def find_source(explicit: str | Path | None = None) -> Path | None:
    """`explicit`, else $SAPT_DATA_SOURCE, else ../shared beside the working directory. A source that is named but
    is not a release folder is an error; a missing default is None."""
    for value, origin in ((explicit, "--source"), (os.environ.get(SOURCE_ENV), f"${SOURCE_ENV}")):
        if value:
            path = Path(value).expanduser()
            if not is_release_folder(path):
                raise SourceError(f"{origin}={value}: no CL_Benchmark/ or generated_data/ folder there")
            return path
    path = default_source()
    return path if is_release_folder(path) else None


def _same_place(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    except OSError:
        return False


def _copy_file(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)


def fill_tree(source: str | Path, dest: str | Path, mode: str = "link") -> dict[str, int]:
    """Symlink (mode="link") or copy (mode="copy") every task folder of `source` into `dest`.
    Existing entries are never overwritten: a correct link or folder is kept, in copy mode only the
    files absent from an existing folder are added; a dangling link is replaced."""
    if mode not in ("link", "copy"):
        raise ValueError(f"mode must be 'link' or 'copy', not {mode!r}")
    source, dest = Path(source).resolve(), Path(dest)
    stats = defaultdict(int)
    for top, depth in RELEASE_FOLDERS.items():
        src_top = source / top
        if not src_top.is_dir():
            continue
        if _same_place(src_top, dest / top):
            logger.info("%s is the source itself; nothing to fill", dest / top)
            continue
        for src_task in sorted(src_top.glob("/".join(["*"] * depth))):
            if not src_task.is_dir() or src_task.name.startswith("."):
                continue
            _place(src_task, dest / src_task.relative_to(source), mode, stats)
    logger.info(
        "filled %s from %s (%s): %d linked, %d folders copied, %d files copied, %d kept",
        dest, source, mode, stats["linked"], stats["copied_folders"], stats["copied_files"], stats["kept"],
    )
    return dict(stats)


def _place(src: Path, dst: Path, mode: str, stats: dict) -> None:
    if dst.is_symlink():
        if not dst.exists():
            logger.info("replacing dangling link %s", dst)
            dst.unlink()
        else:
            if not _same_place(src, dst):
                logger.info("keeping %s (links to %s, not to the source)", dst, os.readlink(dst))
            stats["kept"] += 1
            return
    elif dst.is_dir():
        if mode == "copy":
            for file in sorted(src.iterdir()):
                if file.is_file() and not (dst / file.name).exists():
                    _copy_file(file, dst / file.name)
                    stats["copied_files"] += 1
        stats["kept"] += 1
        return
    elif dst.exists():
        logger.warning("%s exists and is not a folder; left alone", dst)
        stats["kept"] += 1
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "link":
        dst.symlink_to(src, target_is_directory=True)
        stats["linked"] += 1
        return
    dst.mkdir()
    for file in sorted(src.iterdir()):
        if file.is_file():
            _copy_file(file, dst / file.name)
            stats["copied_files"] += 1
    stats["copied_folders"] += 1


# --------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog="python -m sapt prepare_data", description=__doc__.splitlines()[0])
    parser.add_argument("--source", help=f"release folder (default: ${SOURCE_ENV}, else ../shared beside the working directory)")
    parser.add_argument("--dest", default=".", help="folder that receives CL_Benchmark/ and generated_data/")
    parser.add_argument("--verify-only", action="store_true", help="only verify <dest> against the manifest")
    parser.add_argument("--synthetic-if-missing", action="store_true",
                        help="write the synthetic benchmark into <dest> when no release data is found")
    parser.add_argument("--synthetic", action="store_true", help="write the synthetic benchmark into --dest")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic benchmark")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--link", dest="mode", action="store_const", const="link", help="symlink task folders (default)")
    mode.add_argument("--copy", dest="mode", action="store_const", const="copy", help="copy task folders")
    parser.set_defaults(mode="link")
    parser.add_argument("--manifest", help="manifest to verify against (default: the packaged manifest.json)")
    parser.add_argument("--write-manifest", metavar="DATA_MANIFEST_JSON",
                        help="regenerate the packaged manifest.json from a release's DATA_MANIFEST.json")
    parser.add_argument("--verbose", "-v", action="store_true", help="list every missing file")
    return parser


def _synthetic_banner(dest: Path) -> None:
    bar = "!" * 78
    for line in (bar, f"NO RELEASE DATA FOUND: writing the SYNTHETIC benchmark into {dest}",
                 "The demo runs on SYNTHETIC data (toy tasks), NOT on the released SAPT benchmark.",
                 f"For the real data: make data SOURCE=/path/to/release (or set ${SOURCE_ENV}).", bar):
        logger.warning("%s", line)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_cli_logging()
    dest = Path(args.dest)
    if args.write_manifest:
        write_manifest(args.write_manifest, args.manifest or MANIFEST_PATH)
        return EXIT_OK
    if args.synthetic:
        write_synthetic_benchmark(dest, seed=args.seed)
        logger.warning("wrote SYNTHETIC data (not the released benchmark) under %s", dest)
        return EXIT_OK
    manifest = load_manifest(args.manifest)
    has_release = any((dest / path).exists() for path in manifest)
    if not args.verify_only:
        try:
            source = find_source(args.source)
        except SourceError as err:
            logger.error("%s", err)
            return EXIT_NO_DATA
        if source is not None:
            logger.info("release data source: %s", source)
            fill_tree(source, dest, args.mode)
            has_release = any((dest / path).exists() for path in manifest)
        elif not has_release and args.synthetic_if_missing:
            _synthetic_banner(dest)
            write_synthetic_benchmark(dest, seed=args.seed, root_note=False)
            return EXIT_OK
        elif not has_release:
            logger.error(
                "no release data found (looked at $%s and %s); pass --source PATH or use --synthetic-if-missing",
                SOURCE_ENV, default_source(),
            )
            return EXIT_NO_DATA
        else:
            logger.info("no source found; verifying the data already in %s", dest)
    if not has_release:
        if (dest / "CL_Benchmark" / "SYNTHETIC.md").is_file():
            logger.warning("%s holds the SYNTHETIC benchmark only; nothing of the release to verify", dest)
            return EXIT_OK
        logger.error("no file of the release under %s", dest)
        return EXIT_NO_DATA
    if (dest / "CL_Benchmark" / "SYNTHETIC.md").is_file():
        logger.warning("%s also holds SYNTHETIC tasks (see CL_Benchmark/SYNTHETIC.md)", dest)
    report = verify_tree(dest, manifest)
    log_report(report, verbose=args.verbose)
    if report.passed:
        logger.info("all %d present release files match the manifest", len(report.ok))
    return EXIT_OK if report.passed else EXIT_ALTERED
