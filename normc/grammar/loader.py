"""Load a `.nc` program: the file, its `use` imports and the standard library (`std.*`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
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
    """The standard library's modules, parsed once per process (and again if a file changes).

    Every program shares these ASTs: nothing after parsing may change them except the loader's
    `qualname`, which is `std.NAME` for every program."""
    files = sorted(STD_DIR.glob("*.nc"))
    return _parse_std(tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files))


@lru_cache(maxsize=2)
def _parse_std(stamps: tuple) -> list[tuple[str, T.Module]]:
    return [(Path(p).stem, parse_file(p)) for p, _, _ in stamps]


def load_std() -> Program:
    program = Program(main=T.Module(file="<std>", source=""))
    for stem, module in std_modules():
        _add_module(program, module, "std.", f"std.{stem}")
    return program


def load_program(path: str | Path | None = None, text: str | None = None, file: str = "<string>",
                 rules_path=()) -> Program:
    """The program of a rules file (or text), with every file it `use`s, transitively.

    `use "x.nc"` reads only `.nc` files, found beside the file that says it or in a
    `rules_path` folder (`--rules-path`), and never outside those folders and the standard
    library: a shared rules file cannot read the rest of the disk. A cycle is a located error.
    """
    main = parse_file(path) if path is not None else parse_text(text or "", file)
    program = Program(main=main)
    _add_module(program, main, "", None)
    std = dict(std_modules())
    for stem, module in std.items():
        _add_module(program, module, "std.", f"std.{stem}")
    roots = [Path(p).resolve() for p in rules_path]
    for root, given in zip(roots, rules_path):
        if not root.is_dir():
            from ..errors import NormcError
            raise NormcError(f"--rules-path `{given}` is not a folder", "give a folder that holds .nc files")
    start = Path(main.file).resolve() if path is not None else None
    _Imports(program, std, roots).visit(main, start, [])
    return program


class _Imports:
    """Depth-first walk of `use`: each file loaded once, a cycle reported where it closes."""

    def __init__(self, program: Program, std: dict, roots: list[Path]):
        self.program, self.std, self.roots = program, std, roots
        self.loaded: dict[Path, tuple[str, T.Use]] = {}  # file -> (alias, the first use of it)

    def visit(self, module: T.Module, file: Path | None, stack: list[Path]):
        base = file.parent if file is not None else Path.cwd().resolve()
        for use in module.uses:
            if not use.is_path:
                self.check_std(use, module)
                continue
            target = self.locate(use, module, base)
            if target in stack or target == file:
                chain = [*stack[stack.index(target):], file] if target in stack else [file]
                cycle = " -> ".join(p.name for p in [*chain, target])
                raise NcError([Diagnostic(use.loc, f"`use` makes a cycle: {cycle}",
                                          "move the shared rules into a file that both use")], module.source)
            alias = use.alias or target.stem
            if target in self.loaded:
                first_alias, first = self.loaded[target]
                if first_alias != alias:
                    raise NcError([Diagnostic(use.loc, f"`{use.target}` is already used as `{first_alias}` "
                                              f"({first.loc.file}:{first.loc.line})",
                                              f"write `as {first_alias}`: a file's rules have one name")], module.source)
                continue
            self.loaded[target] = (alias, use)
            imported = parse_file(target)
            _add_module(self.program, imported, f"{alias}.", alias)
            self.visit(imported, target, [*stack, file] if file is not None else stack)

    def check_std(self, use: T.Use, module: T.Module):
        std = self.std
        if use.target == "std" or (use.target.startswith("std.") and use.target[4:] in std):
            return
        hint = did_you_mean(use.target, [f"std.{s}" for s in std]) or \
            f"the standard library has {', '.join('std.' + s for s in std)}; use \"path.nc\" for your own files"
        raise NcError([Diagnostic(use.loc, f"unknown module `{use.target}`", hint)], module.source)

    def locate(self, use: T.Use, module: T.Module, base: Path) -> Path:
        """The file a `use "..."` names; only a `.nc` file inside an allowed folder (nothing else is opened)."""
        def refuse(message, hint):
            raise NcError([Diagnostic(use.loc, message, hint)], module.source)

        if "\0" in use.target:  # the OS cannot name it (and Path.resolve raises ValueError)
            refuse("a path cannot contain a NUL character (\\0)", "remove it from the path")
        if not use.target.endswith(".nc"):
            refuse(f"`{use.target}` is not a rules file", "`use` reads only .nc files")
        allowed = [base, *self.roots, STD_DIR]
        folders = [base, *self.roots]
        outside = False
        for folder in folders:
            target = (folder / use.target).resolve()  # symbolic links followed: where the bytes really are
            if not any(target.is_relative_to(root) for root in allowed):
                outside = True
                continue
            if target.is_file():
                if target.suffix != ".nc":
                    refuse(f"`{use.target}` is not a rules file (it links to a file that is not .nc)",
                           "`use` reads only .nc files")
                return target
        if outside:
            refuse(f"`{use.target}` is outside the folders rules may be read from",
                   f"rules are read beside {module.file}, in the standard library and in folders given with --rules-path")
        looked = ", ".join(str(f) for f in folders)
        refuse(f"cannot find `{use.target}` (looked in {looked})",
               "paths in `use` are relative to the file that says it; add folders with --rules-path")
