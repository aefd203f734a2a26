"""The prompt editor's files: find a prompt's files on the search path, split and join the
system file's front matter, save edits atomically with conflict detection, only inside the
prompts directories.

A prompt is opened by its short name (``summarize`` for ``summarize.system.md``) among the
prompts :func:`tinyllm.prompts.list_prompts` finds (broken ones included, so they can be
fixed); a name is never taken as a path. Each file's version is the sha256 of its bytes
(``"absent"`` for a user file that does not exist yet).
"""

from __future__ import annotations

import difflib
import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import (
    PromptConflictError,
    PromptSaveError,
    TemplateError,
    TemplateNotFoundError,
)
from ..prompts import Prompt, list_prompts, search_path

__all__ = [
    "ABSENT",
    "PromptFiles",
    "find_prompt",
    "join_front_matter",
    "prompt_rows",
    "save_prompt",
    "split_front_matter",
    "version_of",
]

ABSENT = "absent"  # the version of a file that does not exist
_save_lock = threading.Lock()


@dataclass
class PromptFiles:
    """One prompt's files as the editor opens them.

    Attributes:
        name (str): the short name (``summarize``).
        system_path (Path): the system file.
        user_path (Path): the user file (it may not exist yet: then ``user_exists`` is False).
        prompt (Prompt | None): the loaded prompt, None when it does not load.
        error (TemplateError | None): why it does not load.
    """

    name: str
    system_path: Path
    user_path: Path
    prompt: Prompt | None
    error: TemplateError | None

    @property
    def user_exists(self) -> bool:
        return self.user_path.is_file()

    def texts(self) -> tuple[str, str]:
        """(system file text, user file text or ""), as on disk now (newlines normalized)."""
        return _read(self.system_path), _read(self.user_path) if self.user_exists else ""

    def versions(self) -> tuple[str, str]:
        """(system file version, user file version): see :func:`version_of`."""
        return version_of(self.system_path), version_of(self.user_path)


def _short(system_file: str) -> str:
    head, sep, _ = system_file.rpartition(".system.")
    return head if sep and head else system_file


def _user_beside(system_path: Path) -> Path:
    head, sep, ext = system_path.name.rpartition(".system.")
    return system_path.with_name(f"{head}.user.{ext}" if sep and head else f"{system_path.name}.user.md")


def prompt_rows(dirs: list[str]) -> list[PromptFiles]:
    """Every prompt on the search path ``dirs`` (then PROMPTS_DIRS, ./prompts), loaded or broken, in
    :func:`list_prompts` order (broken ones last)."""
    errors: list[tuple[Path, TemplateError]] = []
    loaded = list_prompts(dirs, errors=errors)
    rows = [
        PromptFiles(_short(p.system_path.name), p.system_path, p.user_path or _user_beside(p.system_path), p, None)
        for p in loaded
    ]
    rows += [PromptFiles(_short(path.name), path, _user_beside(path), None, exc) for path, exc in errors]
    return rows


def find_prompt(name: str, dirs: list[str]) -> PromptFiles:
    """The prompt whose short name or system file name is ``name`` among :func:`prompt_rows`.

    Raises:
        TemplateNotFoundError: no such prompt (a path, ``../x``, is never looked up).
    """
    for row in prompt_rows(dirs):
        if name in (row.name, row.system_path.name):
            return row
    raise TemplateNotFoundError(name, [str(d) for d in search_path(dirs)])


def split_front_matter(text: str) -> tuple[str, str]:
    """(front matter YAML without its ``---`` lines, body) of a system file's text; ("", text) without one."""
    lines = text.split("\n")
    if lines and lines[0].rstrip() == "---":
        for i in range(1, len(lines)):
            if lines[i].rstrip() == "---":
                return "\n".join(lines[1:i]), "\n".join(lines[i + 1 :])
    return "", text


def join_front_matter(front_matter: str, body: str) -> str:
    """The file text for ``front_matter`` (YAML, may be empty) and ``body``."""
    front_matter = front_matter.strip("\n")
    return f"---\n{front_matter}\n---\n{body}" if front_matter.strip() else body


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")


def version_of(path: Path) -> str:
    """The sha256 (hex) of the file's bytes, or :data:`ABSENT` when there is no such file."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return ABSENT


def _inside(path: Path, dirs: list[Path]) -> bool:
    real = os.path.realpath(path)
    for d in dirs:
        root = os.path.realpath(d)
        if os.path.commonpath([real, root]) == root and real != root:
            return True
    return False


def _check_target(path: Path, dirs: list[Path], kind: str) -> None:
    """Refuse a path outside the prompts directories (symlinks resolved) or not named like a prompt file."""
    if f".{kind}." not in path.name or path.name.startswith("."):
        raise PromptSaveError(f"{path}: not a {kind} template file (NAME.{kind}.EXT); not saved", path=str(path))
    if not _inside(path, dirs) or os.path.dirname(os.path.realpath(path)) != os.path.realpath(path.parent):
        raise PromptSaveError(
            f"{path}: outside the prompts directories ({', '.join(map(str, dirs))}); not saved", path=str(path)
        )


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to a temporary file in the same folder, fsync it, rename it over ``path``
    (readers see the old file or the new one, never a part); the old file's permissions are kept."""
    mode = None
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_prompt(
    files: PromptFiles, system_text: str, user_text: str, versions: tuple[str, str], dirs: list[str]
) -> tuple[str, str]:
    """Save the editor's texts over ``files`` when neither file changed on disk since it was opened.

    Args:
        files: the prompt, from :func:`find_prompt` (the paths are the server's, never the browser's).
        system_text: the system file's whole text (front matter joined, see :func:`join_front_matter`).
        user_text: the user file's text; "" for a prompt without a user file leaves it absent.
        versions: (system, user) versions (:func:`version_of`) from when the editor opened them.
        dirs: the ``--prompts-dir`` directories; every file must be inside the search path
            (:func:`tinyllm.prompts.search_path`, symlinks resolved).

    Returns:
        the new (system, user) versions.

    Raises:
        PromptConflictError: a file's version on disk is not ``versions``' (nothing written;
            ``.diff`` from the disk's text to ``system_text``/``user_text``).
        PromptSaveError: a file outside the prompts directories, or not writable.
        TemplateError: the texts do not parse (nothing written): an edit that would break the prompt is refused.
    """
    roots = [d for d in search_path(dirs) if d.is_dir()]
    targets = [(files.system_path, system_text, versions[0], "system")]
    if user_text.strip() or files.user_exists:
        targets.append((files.user_path, user_text, versions[1], "user"))
    for path, _, _, kind in targets:
        _check_target(path, roots, kind)
    if files.prompt is not None:  # an edit that does not parse is refused before anything is written
        files.prompt.with_texts(system_text, user_text if len(targets) == 2 else None)
    with _save_lock:
        diffs = []
        for path, text, expected, _ in targets:
            if version_of(path) != expected:
                on_disk = _read(path) if path.exists() else ""
                diffs.append(
                    "".join(
                        difflib.unified_diff(
                            on_disk.splitlines(True),
                            text.splitlines(True),
                            f"{path} (on disk now)",
                            f"{path} (your edit)",
                        )
                    )
                )
        if diffs:
            raise PromptConflictError(
                f"{files.name}: the file changed on disk since it was opened; nothing was saved. "
                "Reload the page to see the new version, or copy your edit first.",
                path=str(targets[0][0]),
                diff="\n".join(diffs),
            )
        for path, text, _, _ in targets:
            try:
                _write_atomically(path, text)
            except OSError as exc:
                raise PromptSaveError(f"{path}: cannot write: {exc.strerror or exc}", path=str(path)) from exc
    return version_of(files.system_path), version_of(files.user_path)
