"""Functions with real signatures, made from declared parameter lists.

The public functions and the registered ops take the options that ``options.py`` declares. So
that every parameter still has its name, default and annotation (``help()``, ``inspect``,
``torch.library``'s schema inference and Dynamo all read them), the functions are written as
source text from the declaration and compiled with ``exec``, as :mod:`dataclasses` writes
``__init__``. Each generated function only collects its arguments by name and calls ``body``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

NO_DEFAULT: Any = object()


@dataclass(frozen=True)
class FunctionParameter:
    """A parameter of a generated function. ``default`` is ``NO_DEFAULT`` for a required one."""

    name: str
    annotation: str
    default: Any
    keyword_only: bool = False


def make_function(
    name: str,
    parameters: Sequence[FunctionParameter],
    body: Callable[[dict[str, Any]], Any],
    *,
    returns: str,
    doc: str | None,
    module_globals: dict[str, Any],
) -> Callable[..., Any]:
    """``def name(<parameters>) -> returns: return body({parameter name: value, ...})``.

    The function lives in the module whose ``globals()`` are ``module_globals``: its
    ``__globals__`` and ``__module__`` are that module's (Dynamo resolves a function's globals
    through its module), and annotations, kept as strings, resolve there. ``body`` and the
    defaults reach it as closure variables, so nothing is added to the module.
    """
    listed = []
    keyword_only_started = False
    defaults: dict[str, Any] = {}
    for parameter in parameters:
        if parameter.keyword_only and not keyword_only_started:
            listed.append("*")
            keyword_only_started = True
        text = f"{parameter.name}: {parameter.annotation}"
        if parameter.default is not NO_DEFAULT:
            default_name = f"_default_{parameter.name}"
            defaults[default_name] = parameter.default
            text += f" = {default_name}"
        listed.append(text)
    arguments = ", ".join(f"{p.name!r}: {p.name}" for p in parameters)
    closure = ", ".join(["_body", *defaults])
    source = (
        "from __future__ import annotations\n"
        f"def _make({closure}):\n"
        f"    def {name}({', '.join(listed)}) -> {returns}:\n"
        f"        return _body({{{arguments}}})\n"
        f"    return {name}\n"
    )
    code = compile(source, f"<flash_varlen generated {name}>", "exec", dont_inherit=True)
    factory_scope: dict[str, Any] = {}
    exec(code, module_globals, factory_scope)  # noqa: S102
    function = factory_scope["_make"](body, *defaults.values())
    function.__doc__ = doc
    function.__qualname__ = name
    return function
