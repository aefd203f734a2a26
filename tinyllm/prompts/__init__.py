"""Prompt files: the search path, YAML front matter, sandboxed Jinja rendering into messages.

A prompt is ``NAME.system.md`` (and, found with it, ``NAME.user.md``) on the search path
(``prompts_dir=``, then ``PROMPTS_DIRS``, then ``./prompts``). :func:`load_prompt` returns a
:class:`Prompt`; ``Prompt.render(**variables)`` returns the chat ``messages``.
"""

from __future__ import annotations

from ._templates import OUTPUT_TYPES, ROLES, Prompt, list_prompts, load_prompt, render_string, search_path

__all__ = ["Prompt", "load_prompt", "search_path", "list_prompts", "render_string", "ROLES", "OUTPUT_TYPES"]
