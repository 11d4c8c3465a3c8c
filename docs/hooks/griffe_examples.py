"""Griffe extension: read the package's Google-style `Example:` sections as examples.

Griffe's Google parser knows only the plural heading; under `Example:` the `>>>` lines would
render as prose. The package's docstrings keep the singular (Google's style guide allows both).
"""

import re

import griffe

_HEADING = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Renames each docstring's `Example:` heading to `Examples:` before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
