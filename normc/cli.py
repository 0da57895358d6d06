"""The `normc` command. Exit codes: 0 ok, 1 verification failed (or, with --require-applied, no site
was rewritten), 2 usage/input error, 3 backend missing, 4 internal error (rerun with --debug)."""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import click

from .errors import EXIT_INTERNAL, EXIT_VERIFY_FAILED, NormcError


def _console():
    from rich.console import Console
    return Console(stderr=True, highlight=False)


class _Cli(click.Group):
    """Turns every NormcError into its one-line message and exit code; tracebacks only with --debug."""

    def invoke(self, ctx):
        debug = "--debug" in sys.argv
        try:
            return super().invoke(ctx)
        except NormcError as e:
            if debug:
                traceback.print_exc()
            click.echo(e.render(), err=True)
            sys.exit(e.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # a bug in normc: say so in one line
            if debug:
                traceback.print_exc()
            else:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                click.echo(f"internal error: {type(e).__name__}: {first[:300]}\n"
                           "  fix: rerun with --debug for the traceback, and report it", err=True)
            sys.exit(EXIT_INTERNAL)


def _common(f):
    """Options shared by apply and check (their values arrive as **opts)."""
    f = click.option("--rollback", is_flag=True, help="roll back the sites that break verification (found by bisection) and go on")(f)
    f = click.option("--strict", is_flag=True, help="with --rollback: any rollback still fails the run")(f)
    f = click.option("--junit", "junit_path", type=click.Path(dir_okay=False), help="write a JUnit XML file (one case per rule x output)")(f)
    f = click.option("--diff", "diff_path", type=click.Path(dir_okay=False), help="write an HTML picture of the graph before and after")(f)
    f = click.option("--weights", type=click.Path(dir_okay=False), help="weights for a factory model: .safetensors or a state dict")(f)
    f = click.option("--allow-pickle", is_flag=True, help="allow pickled weights: a whole-module .pt, or the .bin weights of a Hugging Face directory (unpickling runs code from the file)")(f)
    f = click.option("--report", "report_path", type=click.Path(dir_okay=False), help="write the JSON report here")(f)
    f = click.option("--samples", default=4, show_default=True, type=click.IntRange(min=1),
                     help="random verification inputs (besides the example input)")(f)
    f = click.option("--seed", default=0, show_default=True, help="seed for verification inputs")(f)
    f = click.option("--debug", is_flag=True, help="show Python tracebacks")(f)
    f = _rules_path(f)
    f = click.option("--allow-outside-writes", is_flag=True,
                     help="let `export ... to PATH` in the rules write outside the current and -o folders")(f)
    f = click.option("--allow-outside-reads", is_flag=True,
                     help="let `calibrate from PATH` in the rules read outside its own and the current folder")(f)
    f = click.option("--static", is_flag=True, help="trace and export at the example shape only (default: batch, "
                     "sequence and image size stay dynamic where the model allows it)")(f)
    f = click.option("--require-applied", is_flag=True, help="exit 1 when no rule rewrote any site")(f)
    f = click.option("-q", "--quiet", is_flag=True, help="no progress lines on stderr")(f)
    return _hf_options(f)


def _rules_path(f):
    return click.option("--rules-path", "rules_path", multiple=True, type=click.Path(file_okay=False),
                        help="a folder `use \"x.nc\"` may read rules from (repeatable)")(f)


def _hf_options(f):
    """How a Hugging Face directory is loaded (normc.frontend.hf)."""
    f = click.option("--task", default=None, help="Hugging Face directory: the class to load instead of "
                     "config.architectures: a task (base, causal-lm, masked-lm, sequence-classification, "
                     "image-classification, ...), an auto class or a model class name")(f)
    f = click.option("--trust-remote-code", is_flag=True, help="Hugging Face directory: allow its own modelling "
                     "code (config auto_map) to run")(f)
    f = click.option("--batch", type=click.IntRange(min=1), default=None,
                     help="Hugging Face directory: batch size of the example inputs [1]")(f)
    f = click.option("--seq-len", type=click.IntRange(min=1), default=None,
                     help="Hugging Face directory: sequence length of the example token inputs [16]")(f)
    f = click.option("--image-size", type=click.IntRange(min=1), default=None,
                     help="Hugging Face directory: image size of the example pixel_values "
                     "[config.image_size, else 224]")(f)
    return f


def _hf_load_options(opts) -> dict:
    return {k: opts.get(k) for k in ("task", "trust_remote_code", "batch", "seq_len", "image_size")}


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="normc")
def main():
    """normc: rewrite trained PyTorch models declaratively, verify them numerically, export them."""


def _output_path(output):
    """-o as given: a trailing / (a checkpoint directory) must survive Path()."""
    if not output:
        return None
    return output if output.endswith(("/", os.sep)) else Path(output)


def _run(rules, model, output, opts, write, dry_run=False):
    from . import api
    from .pipeline import RunOptions, compile_model
    from .report.progress import progress_reporter
    program = api.load_rules(rules, rules_path=opts.get("rules_path", ()))
    # on a terminal a live display; elsewhere (CI logs) one plain line per stage with its duration
    with progress_reporter(enabled=not opts.get("quiet", False)) as say:
        say("loading model")
        loaded = api.load(program, model, weights=opts["weights"], allow_pickle=opts["allow_pickle"],
                          **_hf_load_options(opts))
        options = RunOptions(output=_output_path(output), verify_inputs=opts["samples"], seed=opts["seed"],
                             write=write, dry_run=dry_run, progress=say, rollback=opts.get("rollback", False),
                             strict=opts.get("strict", False), keep_before=bool(opts.get("diff_path")),
                             opset=opts.get("opset"), allow_outside_writes=opts.get("allow_outside_writes", False),
                             allow_outside_reads=opts.get("allow_outside_reads", False),
                             static=opts.get("static", False), require_applied=opts.get("require_applied", False))
        result = compile_model(program, loaded, options)
    _write_reports(result, opts)
    return result


def _write_reports(result, opts):
    """Reports are written whether or not verification passed: they say why."""
    if opts.get("report_path"):
        from .atomic import write_text
        write_text(opts["report_path"], json.dumps(result.report, indent=2, default=str))
    if opts.get("junit_path"):
        from .report.junit import write_junit
        write_junit(result.report, opts["junit_path"])
    if opts.get("diff_path") and result.before is not None:
        from .report.diff_html import render_diff_html
        render_diff_html(result.before, result.graph_module, result.report, opts["diff_path"])


def _summary(result, verb: str):
    from rich.table import Table
    console = _console()
    r = result.report
    table = Table(title=f"normc {verb}: {r['model']}", show_lines=False)
    for col in ("rule", "applied", "skipped", "first skip reason"):
        table.add_column(col)
    for rule in r["rules"]:
        skipped = rule["skipped"]
        table.add_row(rule["name"], str(rule["applied"]), str(len(skipped)),
                      f"{skipped[0]['site']}: {skipped[0]['reason']}" if skipped else "")
    if r["rules"]:
        console.print(table)
    before, after = r["graph"]["before"]["op_counts"], r["graph"]["after"]["op_counts"]
    changed = {k: (before.get(k, 0), after.get(k, 0)) for k in sorted(set(before) | set(after)) if before.get(k, 0) != after.get(k, 0)}
    if changed:
        console.print("ops: " + ", ".join(f"{k} {a}→{b}" for k, (a, b) in changed.items()))
    v = r["verify"]
    if v.get("max_rel_err") is not None:
        status = "[green]passed[/green]" if v["passed"] else "[red]FAILED[/red]"
        console.print(f"verify: {status}  max_abs {v['max_abs_err']:.3g}  max_rel {v['max_rel_err']:.3g}  "
                      f"min cosine {v['min_cosine']:.9f}  ({v['n_inputs']} inputs)")
    nothing = r.get("nothing_rewritten")
    if nothing:
        console.print(f"[yellow]{nothing['message']}[/yellow]"
                      + "".join(f"\n  {x['reason']}" + (f" ({x['sites']} sites)" if x["sites"] > 1 else "")
                                for x in nothing["reasons"]), highlight=False, markup=True)
    for w in r.get("warnings", []):
        console.print(f"[yellow]warning: {w}[/yellow]")
    if not v["passed"]:
        console.print(f"[red]{v.get('failure')}[/red]\nnothing was written")
    for out in result.outputs:
        console.print(f"wrote {out}")


@main.command()
@click.argument("rules", type=click.Path(dir_okay=False))
@click.argument("model")
@click.option("-o", "--output", type=click.Path(), help="output file: .pt2, .onnx, .safetensors or .engine, or DIR/ "
              "(a checkpoint in the original layout, loadable with from_pretrained)")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: 23 if the model has RMSNorm, else 18)")
@_common
@click.option("--stream", is_flag=True, help="rewrite a checkpoint directory block by block (automatic when it "
              "is too big for memory); needs -o DIR/")
def apply(rules, model, output, opset, stream, **opts):
    """Apply RULES (a .nc file) to MODEL, verify, and write the result.

    MODEL is zoo:NAME, path/to/file.py:function, package.module:function, a .pt2 archive,
    a Hugging Face directory (config.json + safetensors), or a pickled .pt module (with --allow-pickle).
    """
    opts["opset"] = opset
    if _streamed(rules, model, output, stream, opts):
        return
    result = _run(rules, model, output, opts, write=True)
    _summary(result, "apply")
    sys.exit(0 if result.passed else EXIT_VERIFY_FAILED)


def _streamed(rules, model, output, forced: bool, opts) -> bool:
    """`apply` on a checkpoint directory too big for memory (or --stream): the streaming executor.
    Returns False when the model is not to be streamed."""
    from .stream import should_stream
    folder = Path(model)
    if not (folder.is_dir() and (folder / "config.json").is_file()):
        if forced:
            raise NormcError(f"--stream needs a checkpoint directory (config.json + safetensors), not `{model}`")
        return False
    go, why = should_stream(folder, forced)
    if not go:
        return False
    if not output or not (str(output).endswith(("/", os.sep)) or Path(output).is_dir()):
        raise NormcError(f"streaming `{model}` ({why}) writes a checkpoint directory",
                         "give -o OUTDIR/ (a path ending in /)")
    from . import api
    from .report.progress import progress_reporter
    from .stream import stream_apply
    program = api.load_rules(rules, rules_path=opts.get("rules_path", ()))
    from .atomic import write_text
    from .grammar.checker import check_data_paths
    check_data_paths(program, opts.get("allow_outside_reads", False))
    try:
        with progress_reporter() as say:
            rep = stream_apply(program, folder, Path(output), reason=why, verify_inputs=opts["samples"],
                               seed=opts["seed"], say=say)
    except NormcError as exc:  # the report still tells which units passed, and the failing one's figures
        partial = getattr(exc, "stream_report", None)
        if partial is not None and opts.get("report_path"):
            write_text(opts["report_path"], json.dumps({"stream": partial.to_dict()}, indent=2, default=str))
        raise
    d = rep.to_dict()
    if opts.get("report_path"):
        write_text(opts["report_path"], json.dumps({"stream": d}, indent=2, default=str))
    console = _console()
    console.print(f"streamed {d['blocks']} blocks of {d['block_path']} ({d['dtype']}): {why}")
    e2e = d["end_to_end"]
    console.print(f"worst block: {d['worst_block']['unit']} max_rel {d['worst_block']['max_rel_err']:.3g}; "
                  f"end to end: max_rel {e2e['max_rel_err']:.3g} ({e2e['inputs']} inputs)")
    if "original_vs_float32_rel" in e2e:
        console.print(f"against the checkpoint computed in float32: original {e2e['original_vs_float32_rel']:.3g}, "
                      f"rewritten {e2e['rewritten_vs_float32_rel']:.3g} (max_rel of the logits)")
    console.print(f"largest block {d['largest_block_bytes'] / 1e6:.0f} MB, peak RSS {d['peak_rss_bytes'] / 1e9:.2f} GB, "
                  f"{d['seconds']:.0f} s")
    for w in d["warnings"]:
        console.print(f"[yellow]warning: {w}[/yellow]")
    console.print(f"wrote {output}")
    return True


@main.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="output file: .pt2, .onnx, .safetensors or .engine")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: 23 if the model has RMSNorm, else 18)")
@_common
def export(model, output, opset, **opts):
    """Export MODEL unchanged (traced, canonicalized, verified against the original) to OUTPUT."""
    import tempfile
    opts["opset"] = opset
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "export.nc"
        empty.write_text("# no rules: export only\n")
        result = _run(str(empty), model, output, opts, write=True)
    _summary(result, "export")
    sys.exit(0 if result.passed else EXIT_VERIFY_FAILED)


@main.command()
@click.argument("rules", type=click.Path(dir_okay=False))
@click.argument("model")
@_common
def check(rules, model, **opts):
    """Verify that RULES keep MODEL equivalent; writes nothing but reports. Exit 0 pass, 1 fail, 2 error."""
    result = _run(rules, model, None, opts, write=False)
    _summary(result, "check")
    sys.exit(0 if result.passed else EXIT_VERIFY_FAILED)


@main.command()
@click.argument("rules", type=click.Path(dir_okay=False))
@click.argument("model")
@click.option("--weights", type=click.Path(dir_okay=False), help="weights for a factory model")
@click.option("--allow-pickle", is_flag=True, help="allow loading a pickled whole-module .pt")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="write the JSON report here")
@click.option("--all", "show_all", is_flag=True, help="also list near misses whose root op matched only")
@click.option("--debug", is_flag=True, help="show Python tracebacks")
@_rules_path
@_hf_options
def explain(rules, model, weights, allow_pickle, report_path, show_all, debug, rules_path, **hf):
    """Show where each rule of RULES would apply to MODEL, and why not elsewhere; changes nothing.

    Each rule is matched against the model as loaded (rules do not see each other's rewrites).
    """
    opts = dict(weights=weights, allow_pickle=allow_pickle, samples=0, seed=0, report_path=report_path,
                rules_path=rules_path, **hf)
    result = _run(rules, model, None, opts, write=False, dry_run=True)
    _explain(result, show_all)


def _explain(result, show_all: bool):
    from collections import defaultdict
    for rule in result.report["rules"]:
        click.echo(f"{rule['name']}: {rule['applied']} site(s) match, {len(rule['skipped'])} refused"
                   + (f", {rule['near_miss_count']} near miss(es)" if rule.get("near_miss_count") else ""))
        groups = defaultdict(list)
        for s in rule["sites"]:
            groups[_group(s["site"])].append(("✓", s["site"], ""))
        for s in rule["skipped"]:
            groups[_group(s["site"])].append(("✗", s["site"], s["reason"]))
        if show_all:
            for s in rule["near_misses"]:
                groups[_group(s["site"])].append(("·", s["site"], s["reason"]))
        for group in sorted(groups):
            click.echo(f"  {group or '(top level)'}")
            for mark, site, reason in groups[group]:
                click.echo(f"    {mark} {site}" + (f": {reason}" if reason else ""))
        for note in rule.get("notes", []):
            click.echo(f"  note: {note}")


def _group(site: str) -> str:
    path = site.split(" (", 1)[0]
    return path.rsplit(".", 1)[0] if "." in path else ""


@main.command()
@click.argument("rules", type=click.Path(dir_okay=False), required=False)
@click.option("--rule", "rule_names", multiple=True, help="only this rule (repeatable); default: every rule in RULES")
@click.option("--std", "std_only", is_flag=True, help="prove the standard library")
@click.option("--debug", is_flag=True, help="show Python tracebacks")
@_rules_path
def prove(rules, rule_names, std_only, debug, rules_path):
    """Check rules without a model: random instances of each pattern, pattern vs replacement.

    Exit 0 when every rule is sound, 1 when any is unsound.
    """
    from . import api
    from .grammar.loader import load_std
    from .verify.prove import format_table, prove_program
    if rules is None and not std_only:
        raise click.UsageError("give a RULES file, or --std for the standard library")
    program = load_std() if rules is None else api.load_rules(rules, rules_path=rules_path)
    names = list(rule_names) or ([n for n in program.rules if n.startswith("std.")] if rules is None
                                  else [n for n in program.rules if not n.startswith("std.")])
    missing = [n for n in names if n not in program.rules]
    if missing:
        from .errors import NormcError
        from .grammar.diagnostics import did_you_mean
        raise NormcError(f"no rule `{missing[0]}` in {rules or 'the standard library'}", did_you_mean(missing[0], program.rules))
    results = prove_program(program, names)
    click.echo(format_table(results))
    sys.exit(EXIT_VERIFY_FAILED if any(r.verdict == "unsound" for r in results) else 0)


@main.command()
@click.option("--ops", is_flag=True, help="list the canonical ops instead")
def passes(ops):
    """List the standard rules (std.*) with one-line docs."""
    from .grammar.loader import load_std
    if ops:
        from .ir.ops import ALIASES, OPS
        for name, s in OPS.items():
            click.echo(f"{name}({', '.join(o.name + ('?' if o.optional else '') for o in s.operands)}"
                       f"{'; ' + ', '.join(s.attrs) if s.attrs else ''})  {s.doc}")
        for alias, (base, rank) in ALIASES.items():
            click.echo(f"{alias}  = {base} with a {rank}-d weight")
        return
    program = load_std()
    for group, names in program.groups.items():
        click.echo(f"{group}")
        for name in names:
            rule = program.rules[name]
            params = ", ".join(f"{p.name}: {p.type} = {p.default}" for p in rule.params)
            click.echo(f"  {name}{'(' + params + ')' if params else ''}  [{rule.kind}]  {rule.doc}")


@main.command()
@click.option("--write", "write_args", nargs=2, metavar="NAME DIR",
              help="write a random-weight checkpoint directory of a big shape (llama-7b, opt-1.3b, llama-mini)")
def zoo(write_args):
    """List the built-in models (no downloads; random weights unless stated), or write a big one to disk."""
    from .frontend import ZOO
    from .frontend.zoo import BIG_SHAPES, write_big_checkpoint
    if write_args:
        name, folder = write_args
        try:
            files = write_big_checkpoint(name, folder, say=lambda m: click.echo(m, err=True))
        except NormcError as e:
            click.echo(e.render(), err=True)
            sys.exit(e.exit_code)
        click.echo(f"wrote {folder}: {len(files)} files")
        return
    for name, entry in ZOO.items():
        click.echo(f"zoo:{name:<12} {entry.description}")
    for name, (_, _, _, desc) in BIG_SHAPES.items():
        click.echo(f"{name:<16} {desc} (normc zoo --write {name} DIR)")


if __name__ == "__main__":
    main()
