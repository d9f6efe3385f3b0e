"""Functions with real signatures, made from declared parameter lists.

The public functions and the registered ops take the options that ``options.py`` declares. So
that every parameter still has its name, default and annotation (``help()``, ``inspect``,
``torch.library``'s schema inference and Dynamo all read them), the functions are written as
source text from the declaration and compiled with ``exec``, as :mod:`dataclasses` writes
``__init__``. A generated function returns one expression over its parameters (a call of a
closure variable), so a call costs what a hand-written one would.
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


def arguments_by_name(names: Sequence[str]) -> str:
    """The source of a dict of the named parameters: ``{'q': q, 'k': k}``."""
    return "{" + ", ".join(f"{name!r}: {name}" for name in names) + "}"


def call_source(callee: str, positional: Sequence[str], keywords: Sequence[str]) -> str:
    """The source of ``callee(p1, p2, k1=k1, k2=k2)``."""
    return f"{callee}({', '.join([*positional, *(f'{name}={name}' for name in keywords)])})"


def make_function(
    name: str,
    parameters: Sequence[FunctionParameter],
    returned: str,
    closure: dict[str, Any],
    *,
    returns: str,
    doc: str | None,
    module_globals: dict[str, Any],
) -> Callable[..., Any]:
    """``def name(<parameters>) -> returns: return <returned>``.

    ``returned`` is an expression over the parameters and the ``closure`` variables. The
    function lives in the module whose ``globals()`` are ``module_globals``: its ``__globals__``
    and ``__module__`` are that module's (Dynamo resolves a function's globals through its
    module), and annotations, kept as strings, resolve there. The closure variables and the
    defaults reach it as closure cells, so nothing is added to the module.
    """
    listed = []
    keyword_only_started = False
    cells = dict(closure)
    for parameter in parameters:
        if parameter.keyword_only and not keyword_only_started:
            listed.append("*")
            keyword_only_started = True
        text = f"{parameter.name}: {parameter.annotation}"
        if parameter.default is not NO_DEFAULT:
            default_name = f"_default_{parameter.name}"
            cells[default_name] = parameter.default
            text += f" = {default_name}"
        listed.append(text)
    source = (
        "from __future__ import annotations\n"
        f"def _make({', '.join(cells)}):\n"
        f"    def {name}({', '.join(listed)}) -> {returns}:\n"
        f"        return {returned}\n"
        f"    return {name}\n"
    )
    code = compile(source, f"<flash_varlen generated {name}>", "exec", dont_inherit=True)
    factory_scope: dict[str, Any] = {}
    exec(code, module_globals, factory_scope)  # noqa: S102
    function = factory_scope["_make"](*cells.values())
    function.__doc__ = doc
    function.__qualname__ = name
    return function
