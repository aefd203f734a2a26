"""Prompt versions from git: a template as it was at a revision, its files and the files it includes
read with ``git show REV:path`` (nothing is checked out)."""

from __future__ import annotations

import os
import posixpath
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2.loaders import split_template_path

from ..errors import ConfigError, TemplateError

__all__ = ["WORKING", "GitLoader", "Version", "version_at"]

WORKING = "working"  # the version label of the template files as they are on disk


@dataclass
class Version:
    """One version of a prompt: ``label`` (``working`` or the git revision as given), the loaded Prompt,
    and ``commit`` (the full sha of the revision, None for ``working``)."""

    label: str
    prompt: Any
    commit: str | None = None


def _git(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=60, check=False)
    except FileNotFoundError as exc:
        raise ConfigError("--rev needs git, which is not installed") from exc


def _text(data: bytes) -> str:
    return data.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")


class GitLoader(jinja2.BaseLoader):
    """A Jinja loader of the files a template includes, as they were at one commit.

    An include name is looked for in each of ``dirs`` in turn (the prompt's search path, as on disk):
    a directory inside the repository ``root`` gives ``git show SHA:dir/name``, and a file missing at
    that commit is not found there (the working tree's copy is never used); a directory outside the
    repository has no history, so its files are read from disk. Sources are kept once read (a
    commit does not change). Front matter in an included file is dropped, as on disk.

    Args:
        root: the repository's top directory (absolute, symlinks resolved).
        sha: the commit (40 hex digits).
        dirs: the directories searched, in order.

    Raises (from :meth:`get_source`): ``jinja2.TemplateNotFound`` (a TemplateNotFoundError when
    rendered), TemplateError for a file that is not UTF-8.
    """

    def __init__(self, root: str, sha: str, dirs: tuple[str, ...]) -> None:
        self.root, self.sha, self.dirs = root, sha, tuple(dirs)
        self._disk = jinja2.FileSystemLoader([d for d in self.dirs if not self._inside(d)])
        self._found: dict[str, tuple[str, str]] = {}

    def _inside(self, folder: str) -> bool:
        rel = os.path.relpath(os.path.realpath(folder), self.root)
        return rel != ".." and not rel.startswith(".." + os.sep)

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str, Any]:
        from ..prompts._templates import included_body

        found = self._found.get(template)
        if found is None:
            pieces = split_template_path(template)  # refuses ".." like the loader on disk
            for folder in self.dirs:
                if not self._inside(folder):
                    try:
                        source, filename, _ = self._disk.get_source(environment, template)
                    except jinja2.TemplateNotFound:
                        continue
                    found = (source, filename or template)
                    break
                rel = os.path.relpath(os.path.realpath(folder), self.root).replace(os.sep, "/")
                path = posixpath.normpath(posixpath.join(rel, *pieces))
                shown = _git(["show", f"{self.sha}:{path}"], self.root)
                if shown.returncode != 0:
                    continue
                try:
                    text = _text(shown.stdout)
                except UnicodeDecodeError as exc:
                    raise TemplateError(f"{path} at {self.sha[:12]}: not valid UTF-8 (byte {exc.start})") from exc
                found = (text, os.path.join(self.root, *path.split("/")))
                break
            if found is None:
                raise jinja2.TemplateNotFound(template)
            self._found[template] = found
        source, filename = found
        return included_body(source, filename), filename, lambda: True


def version_at(prompt: Any, rev: str) -> Version:
    """The prompt as it was at the git revision ``rev``: its files, and the files they include, read
    with ``git show REV:path`` (nothing is checked out; see :class:`GitLoader`).

    Raises:
        ConfigError: git is missing, the template is not in a git repository, ``rev`` is unknown,
            or the system template did not exist at ``rev``.
        TemplateError: the old template does not parse.
    """
    from ..prompts._templates import Prompt

    folder = str(prompt.system_path.parent)
    top = _git(["rev-parse", "--show-toplevel"], folder)
    if top.returncode != 0:
        raise ConfigError(f"--rev {rev}: {folder} is not in a git repository")
    root = os.path.realpath(top.stdout.decode().strip())
    commit = _git(["rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], root)
    if commit.returncode != 0:
        raise ConfigError(f"--rev {rev}: no such revision in {root}")
    sha = commit.stdout.decode().strip()
    texts: dict[str, str] = {}
    paths: list[Path | None] = []
    for i, path in enumerate((prompt.system_path, prompt.user_path)):
        if path is None:
            paths.append(None)
            continue
        rel = os.path.relpath(os.path.realpath(path), root).replace(os.sep, "/")
        shown = _git(["show", f"{sha}:{rel}"], root)
        if shown.returncode != 0:
            if i == 0:
                raise ConfigError(f"--rev {rev}: {rel} does not exist at {sha[:12]}")
            paths.append(None)  # no user template then
            continue
        try:
            texts[str(path)] = _text(shown.stdout)
        except UnicodeDecodeError as exc:
            raise TemplateError(f"{rel} at {rev}: not valid UTF-8 (byte {exc.start})") from exc
        paths.append(path)
    loader = GitLoader(root, sha, tuple(prompt._dirs))
    return Version(
        rev, Prompt(prompt.name, prompt.system_path, paths[1], prompt._dirs, texts=texts, loader=loader), sha
    )
