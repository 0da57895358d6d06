"""Load a `.nc` program: the file, its `use` imports and the standard library (`std.*`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import syntax_tree as T
from .diagnostics import Diagnostic, NcError, did_you_mean
from .parser import parse_file, parse_text

STD_DIR = Path(__file__).resolve().parent.parent / "passes" / "std"


@dataclass
class Program:
    main: T.Module
    rules: dict[str, T.Rule | T.ExternPass] = field(default_factory=dict)   # qualified name -> rule
    groups: dict[str, list[str]] = field(default_factory=dict)              # `std.bn` -> its rules, in order
    modules: list[T.Module] = field(default_factory=list)

    def resolve(self, name: str) -> list[str]:
        """Rule names an `apply NAME` means: one rule, or every rule of a file (`apply std.bn`)."""
        if name in self.rules:
            return [name]
        if name in self.groups:
            return list(self.groups[name])
        return []

    def names(self) -> list[str]:
        return sorted(set(self.rules) | set(self.groups))


def _add_module(program: Program, module: T.Module, prefix: str, group: str | None):
    program.modules.append(module)
    names = []
    for item in list(module.rules) + list(module.passes):
        qual = f"{prefix}{item.name}"
        item.qualname = qual
        if qual in program.rules:
            prev = program.rules[qual]
            raise NcError([Diagnostic(item.loc, f"rule `{qual}` is defined twice",
                                      f"the first is at {prev.loc.file}:{prev.loc.line}; rename one")], module.source)
        program.rules[qual] = item
        names.append(qual)
    if group:
        clash = program.rules.get(group)
        if clash is not None:
            raise NcError([Diagnostic(clash.loc, f"rule `{group}` has the name of the group of rules in `{module.file}`",
                                      "rename the rule or the file: `apply` could not tell them apart")], clash.module.source
                          if clash.module else None)
        program.groups[group] = names


def std_modules() -> list[tuple[str, T.Module]]:
    return [(p.stem, parse_file(p)) for p in sorted(STD_DIR.glob("*.nc"))]


def load_std() -> Program:
    program = Program(main=T.Module(file="<std>", source=""))
    for stem, module in std_modules():
        _add_module(program, module, "std.", f"std.{stem}")
    return program


def load_program(path: str | Path | None = None, text: str | None = None, file: str = "<string>") -> Program:
    main = parse_file(path) if path is not None else parse_text(text or "", file)
    program = Program(main=main)
    _add_module(program, main, "", None)
    std = dict(std_modules())
    for stem, module in std.items():
        _add_module(program, module, "std.", f"std.{stem}")
    base = Path(main.file).parent
    for use in main.uses:
        if not use.is_path:
            if use.target == "std" or (use.target.startswith("std.") and use.target[4:] in std):
                continue
            hint = did_you_mean(use.target, [f"std.{s}" for s in std]) or \
                f"the standard library has {', '.join('std.' + s for s in std)}; use \"path.nc\" for your own files"
            raise NcError([Diagnostic(use.loc, f"unknown module `{use.target}`", hint)], main.source)
        target = (base / use.target).resolve()
        if not target.is_file():
            raise NcError([Diagnostic(use.loc, f"cannot find `{use.target}` (looked in {base})",
                                      "paths in `use` are relative to the file that says it")], main.source)
        alias = use.alias or target.stem
        _add_module(program, parse_file(target), f"{alias}.", alias)
    return program
