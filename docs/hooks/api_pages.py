"""MkDocs hook: the API reference, one page per public module of fedjax_sim and one for the
names the package exports itself, generated at build time from the `__all__` lists.

Generating the pages keeps the reference complete as modules are added: a new module in
`fedjax_sim.__all__` gets its page (and the strict build checks its docstrings) without anyone
editing the nav.
"""

import inspect
import types

from mkdocs.structure.files import File

import fedjax_sim

API_DIR = "api"
# A member's heading is its short name: the page already says which module it belongs to.
_MEMBER_OPTIONS = "    options:\n      show_root_full_path: false\n      heading_level: 2\n"


def _modules() -> list[str]:
    return sorted(n for n in fedjax_sim.__all__ if inspect.ismodule(getattr(fedjax_sim, n)))


def _target(package: types.ModuleType, name: str) -> str:
    """Where the exported `name` is defined. A package that imports a function under its own
    submodule's name (`algorithms.fedavg`) hides the function from static analysis, so
    functions and classes are documented where they are defined."""
    obj = getattr(package, name)
    if inspect.ismodule(obj):
        return obj.__name__
    if (inspect.isfunction(obj) or inspect.isclass(obj)) and "<" not in obj.__qualname__:
        return f"{obj.__module__}.{obj.__qualname__}"
    return f"{package.__name__}.{name}"


def _exports_page(package: types.ModuleType, names: list[str]) -> str:
    """The package's docstring, then each of `names` where it is defined."""
    head = (f"::: {package.__name__}\n    options:\n      members: false\n"
            "      show_root_heading: false\n")
    entries = [f"::: {_target(package, n)}\n{_MEMBER_OPTIONS}" for n in names]
    return "\n".join([head, *entries])


def _module_page(name: str) -> str:
    module = getattr(fedjax_sim, name)
    exports = getattr(module, "__all__", None)
    if exports is None:  # a plain module: its public members, as griffe finds them
        return f"::: fedjax_sim.{name}\n"
    return _exports_page(module, list(exports))


def on_config(config):
    reference = [{"fedjax_sim": f"{API_DIR}/index.md"}]
    reference += [{f"fs.{m}": f"{API_DIR}/{m}.md"} for m in _modules()]
    config["nav"].append({"API reference": reference})
    return config


def on_files(files, config):
    top = sorted(n for n in fedjax_sim.__all__ if n not in _modules())
    listing = "\n".join(f"- [`fs.{m}`]({m}.md)" for m in _modules())
    index = (f"# fedjax_sim\n\n`import fedjax_sim as fs`. Its modules:\n\n{listing}\n\n"
             f"and the names it exports itself:\n\n{_exports_page(fedjax_sim, top)}")
    files.append(File.generated(config, f"{API_DIR}/index.md", content=index))
    for m in _modules():
        content = f"# fs.{m}\n\n{_module_page(m)}"
        files.append(File.generated(config, f"{API_DIR}/{m}.md", content=content))
    return files
